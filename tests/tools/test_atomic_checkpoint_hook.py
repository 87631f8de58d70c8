"""AtomicCheckpointHook keeps a complete best checkpoint at every instant.

A real MMEngine Runner trains a one-parameter model, validated every epoch
by a metric that reports a scripted score, with ``save_best``. A write of
the best checkpoint can be made to fail half-way, as a kill would stop it.
"""
import os
import os.path as osp

import pytest
import torch
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ddetr_plugin  # noqa: F401
from ddetr_plugin.engine import AtomicCheckpointHook
from ddetr_plugin.utils import load_checkpoint_file


class _LineData(Dataset):

    def __len__(self):
        return 4

    def __getitem__(self, index):
        value = torch.tensor([float(index)])
        return dict(inputs=value, targets=2 * value)


class _ScaleModel(BaseModel):
    """Learns the factor 2 of _LineData."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, inputs, targets, mode='tensor'):
        if mode == 'loss':
            return dict(loss=((self.scale * inputs - targets)**2).mean())
        return [self.scale * inputs]


class _ScriptedScore(BaseMetric):
    """Reports the next of ``scores`` at each validation."""

    def __init__(self, scores):
        super().__init__()
        self.scores = list(scores)

    def process(self, data_batch, data_samples):
        self.results.append(0)

    def compute_metrics(self, results):
        return dict(score=self.scores.pop(0))


def _collate(batch):
    return dict(
        inputs=torch.stack([item['inputs'] for item in batch]),
        targets=torch.stack([item['targets'] for item in batch]))


def _runner(work_dir, scores, hook_type='AtomicCheckpointHook'):
    return Runner(
        model=_ScaleModel(),
        work_dir=str(work_dir),
        train_dataloader=DataLoader(
            _LineData(), batch_size=2, collate_fn=_collate),
        val_dataloader=DataLoader(
            _LineData(), batch_size=2, collate_fn=_collate),
        val_evaluator=Evaluator(_ScriptedScore(scores)),
        train_cfg=dict(by_epoch=True, max_epochs=len(scores), val_interval=1),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(
            checkpoint=dict(
                type=hook_type,
                interval=1,
                max_keep_ckpts=1,
                save_best='score',
                rule='greater')),
        default_scope='ddetr_plugin',
        experiment_name=f'best_{hook_type}_{osp.basename(str(work_dir))}')


class _Killed(Exception):
    """Stands for the process dying in the middle of a write."""


@pytest.fixture(name='kill_during_best_save')
def kill_during_best_save_fixture(monkeypatch):
    """Make the write of ``best_*_epoch_<epoch>`` stop half-way."""
    import mmengine.runner.runner as runner_module
    real_save = runner_module.save_checkpoint

    def arm(epoch):

        def save(checkpoint, filename, *args, **kwargs):
            if f'best_score_epoch_{epoch}.pth' not in osp.basename(filename):
                return real_save(checkpoint, filename, *args, **kwargs)
            real_save(checkpoint, filename, *args, **kwargs)
            with open(filename, 'rb+') as file:
                file.truncate(os.path.getsize(filename) // 2)
            raise _Killed(filename)

        monkeypatch.setattr(runner_module, 'save_checkpoint', save)

    return arm


def _best_files(work_dir):
    return sorted(
        name for name in os.listdir(work_dir) if name.startswith('best_'))


def test_only_the_newest_best_is_kept(tmp_path):
    runner = _runner(tmp_path, scores=[0.1, 0.3, 0.2])
    runner.train()
    assert _best_files(tmp_path) == ['best_score_epoch_2.pth']
    assert runner.message_hub.get_info('best_score') == 0.3
    best_path = runner.message_hub.get_info('best_ckpt')
    assert best_path == str(tmp_path / 'best_score_epoch_2.pth')
    checkpoint = load_checkpoint_file(best_path)
    assert checkpoint['meta']['epoch'] == 2
    # The latest checkpoint was rewritten after the best, so a resumed run
    # knows which best file it may delete.
    latest = load_checkpoint_file(str(tmp_path / 'epoch_3.pth'))
    runtime_info = latest['message_hub']['runtime_info']
    assert runtime_info['best_ckpt'] == best_path
    assert not [name for name in os.listdir(tmp_path) if '.partial-' in name]


@pytest.mark.parametrize('hook_type',
                         ['AtomicCheckpointHook', 'CheckpointHook'])
def test_killed_best_write_keeps_the_previous_best(tmp_path,
                                                   kill_during_best_save,
                                                   hook_type):
    kill_during_best_save(epoch=2)
    runner = _runner(tmp_path, scores=[0.1, 0.3], hook_type=hook_type)
    with pytest.raises(_Killed):
        runner.train()
    old_best = tmp_path / 'best_score_epoch_1.pth'
    new_best = tmp_path / 'best_score_epoch_2.pth'
    partial = [n for n in os.listdir(tmp_path) if '.partial-' in n]
    if hook_type == 'CheckpointHook':
        # MMEngine's hook, for contrast: the old best was deleted before
        # the write, and the truncated file has the final name.
        assert not old_best.exists() and new_best.exists()
        return
    assert load_checkpoint_file(str(old_best))['meta']['epoch'] == 1
    assert not new_best.exists()
    # The half-written file only exists under its temporary name, which the
    # next run deletes.
    assert len(partial) == 1
    assert partial[0].startswith('.best_score_epoch_2.pth')


@pytest.mark.parametrize(('arguments', 'expected'), [
    (dict(max_keep_ckpt=2), "'max_keep_ckpt' (did you mean 'max_keep_ckpts'"),
    (dict(intervall=1), "'intervall' (did you mean 'interval'"),
    (dict(interval='1'), "interval must be an int, got '1' (str)"),
    (dict(by_epoch='yes'), "by_epoch must be True or False, got 'yes'"),
])
def test_argument_typos_fail_when_the_hook_is_built(arguments, expected):
    # CheckpointHook would keep them and fail at its first save, after a
    # whole epoch of training.
    from ddetr_plugin.registry import HOOKS
    with pytest.raises(TypeError) as error:
        HOOKS.build(
            dict(
                type='AtomicCheckpointHook',
                _scope_='ddetr_plugin',
                **arguments))
    assert expected in str(error.value)


def test_valid_arguments_reach_the_hook():
    hook = AtomicCheckpointHook(interval=2, max_keep_ckpts=3, by_epoch=False)
    assert (hook.interval, hook.max_keep_ckpts, hook.by_epoch) == (2, 3, False)
