"""MMEngine checkpoints load under torch's weights-only unpickler, and
nothing else sneaks through."""
import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.model import BaseModel
from mmengine.runner import Runner, load_checkpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ddetr_plugin  # noqa: F401
from ddetr_plugin.utils import (NotACheckpointError, UntrustedCheckpointError,
                                load_checkpoint_file, trust_checkpoint)
from ddetr_plugin.utils.checkpoint import TRUSTED_ENV


class _LineData(Dataset):
    """y = 3x - 1 with a little noise."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.rand(16, 1, generator=generator)
        self.y = 3 * self.x - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return dict(inputs=self.x[index], targets=self.y[index])


class _LineModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, inputs, targets, mode='tensor'):
        prediction = self.linear(inputs)
        if mode == 'loss':
            # A numpy scalar in the log lands in the checkpoint's message hub.
            return dict(loss=((prediction - targets)**2).mean())
        return prediction


def _runner(work_dir, max_epochs, resume=False, load_from=None):
    return Runner(
        model=_LineModel(),
        work_dir=str(work_dir),
        train_dataloader=DataLoader(
            _LineData(),
            batch_size=4,
            shuffle=False,
            collate_fn=lambda batch: dict(
                inputs=torch.stack([b['inputs'] for b in batch]),
                targets=torch.stack([b['targets'] for b in batch]))),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1], gamma=0.5),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=1),
            logger=dict(type='LoggerHook', interval=1)),
        resume=resume,
        load_from=load_from,
        default_scope='ddetr_plugin',
        experiment_name=f'ckpt_{os.path.basename(str(work_dir))}'
        f'_{max_epochs}_{int(resume)}',
    )


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('runner')
    runner = _runner(work_dir, max_epochs=2)
    runner.message_hub.update_info('numpy_scalar', np.float64(0.25))
    runner.train()
    return work_dir, runner


def test_checkpoint_holds_mmengine_metadata(trained):
    work_dir, _ = trained
    checkpoint = load_checkpoint_file(str(work_dir / 'epoch_2.pth'))
    hub = checkpoint['message_hub']
    assert 'train/loss' in hub['log_scalars']
    assert checkpoint['meta']['epoch'] == 2


def test_plain_torch_load_refuses_mmengine_checkpoint(trained):
    """Without the plugin, torch 2.6+ cannot load MMEngine's checkpoints:
    the problem the allow-list solves is real here."""
    work_dir, _ = trained
    code = ('import sys, torch\n'
            'try:\n'
            '    torch.load(sys.argv[1])\n'
            'except Exception as e:\n'
            '    print(type(e).__name__)\n')
    out = subprocess.run(
        [sys.executable, '-c', code,
         str(work_dir / 'epoch_2.pth')],
        capture_output=True,
        text=True,
        check=True)
    assert 'UnpicklingError' in out.stdout


def test_resume_restores_training_state(trained):
    work_dir, _ = trained
    saved = load_checkpoint_file(str(work_dir / 'epoch_2.pth'))
    # Resuming a finished run restores its state and trains no further.
    runner = _runner(work_dir, max_epochs=2, resume=True)
    runner.train()
    assert (runner.epoch, runner.iter) == (2, 8)
    restored = runner.optim_wrapper.state_dict()
    for key, buffer in saved['optimizer']['state'][0].items():
        torch.testing.assert_close(restored['state'][0][key], buffer)
    assert runner.param_schedulers[0].state_dict() == (
        saved['param_schedulers'][0])
    # A longer run continues from there with the halved learning rate.
    runner = _runner(work_dir, max_epochs=3, resume=True)
    runner.train()
    assert (runner.epoch, runner.iter) == (3, 12)
    assert runner.optim_wrapper.get_lr()['lr'][0] == pytest.approx(0.05)


def test_load_from_and_load_checkpoint(trained):
    work_dir, _ = trained
    model = _LineModel()
    checkpoint = load_checkpoint(model, str(work_dir / 'epoch_2.pth'))
    assert 'meta' in checkpoint
    for key, value in model.state_dict().items():
        saved = checkpoint['state_dict'][key]
        torch.testing.assert_close(value, saved)


class _Payload:
    """A foreign class whose unpickling has a side effect."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_foreign_pickle_is_refused(tmp_path):
    marker = tmp_path / 'side_effect'
    path = tmp_path / 'foreign.pth'
    torch.save(dict(state_dict={}, payload=_Payload(str(marker))), path)
    with pytest.raises(UntrustedCheckpointError) as error:
        load_checkpoint(_LineModel(), str(path))
    message = str(error.value)
    assert 'trust_checkpoint' in message and TRUSTED_ENV in message
    assert str(path) in message
    assert not marker.exists()
    # Weights-only loading was not switched off for everyone either.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not marker.exists()


def test_trusted_file_loads_deliberately(tmp_path, monkeypatch):
    path = tmp_path / 'trusted.pth'
    torch.save(dict(state_dict={}, args=argparse.Namespace(lr=0.1)), path)
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint_file(str(path))
    monkeypatch.setenv(TRUSTED_ENV, str(path))
    assert load_checkpoint_file(str(path))['args'].lr == 0.1
    monkeypatch.delenv(TRUSTED_ENV)
    trust_checkpoint(str(path))
    assert load_checkpoint_file(str(path))['args'].lr == 0.1


def test_missing_checkpoint_names_the_file(tmp_path):
    path = tmp_path / 'nope.pth'
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_checkpoint_file(str(path))


def _real_checkpoint(path, legacy=False):
    weights = dict(state_dict=_LineModel().state_dict(), meta=dict(epoch=1))
    torch.save(weights, path, _use_new_zipfile_serialization=not legacy)
    return path


PNG_HEADER = b'\x89PNG\r\n\x1a\n' + bytes(range(56))


@pytest.mark.parametrize(('name', 'content', 'what'), [
    ('notes.pth', b'epoch 12, mAP 0.44\n', 'text'),
    ('picture.pth', PNG_HEADER, 'a PNG image'),
    ('empty.pth', b'', 'an empty file'),
])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, name, content,
                                                  what):
    path = tmp_path / name
    path.write_bytes(content)
    for load in (lambda: load_checkpoint_file(str(path)),
                 lambda: load_checkpoint(_LineModel(), str(path))):
        with pytest.raises(NotACheckpointError) as error:
            load()
        message = str(error.value)
        assert name in message and 'is not a PyTorch checkpoint' in message
        assert what in message
        assert 'trust' not in message


@pytest.mark.parametrize('legacy', [False, True])
def test_a_truncated_checkpoint_is_not_called_untrusted(tmp_path, legacy):
    path = _real_checkpoint(tmp_path / 'epoch_1.pth', legacy)
    assert load_checkpoint_file(str(path))['meta']['epoch'] == 1
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])
    with pytest.raises(NotACheckpointError) as error:
        load_checkpoint_file(str(path))
    message = str(error.value)
    assert 'epoch_1.pth' in message and 'truncated' in message
    assert 'trust' not in message
