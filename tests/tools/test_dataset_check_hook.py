"""DatasetCheckHook: a data set that does not fit the model stops the run
before its first step, with both numbers and the keys to change."""
from types import SimpleNamespace

import pytest
import torch
from mmengine.runner import BaseLoop
from torch.utils.data import DataLoader, Dataset

from ddetr_plugin.engine import DatasetCheckHook, DatasetModelMismatchError
from testkit import repo_path


class _Split(Dataset):
    """A data set with what the hook reads: metainfo, file, box count."""

    def __init__(self, num_classes, num_instances=5):
        self.metainfo = dict(
            classes=tuple(f'class{index}' for index in range(num_classes)))
        self.ann_file = f'annotations/{num_classes}_classes.json'
        self.num_instances = num_instances

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return index


class _Loop(BaseLoop):

    def __init__(self, dataset, format_only=None):
        super().__init__(runner=None, dataloader=DataLoader(dataset))
        if format_only is not None:
            self.evaluator = SimpleNamespace(
                metrics=[SimpleNamespace(format_only=format_only)])

    def run(self):
        pass


def _runner(num_classes=10, train=None, val=None, test=None):
    model = torch.nn.Module()
    model.bbox_head = SimpleNamespace(num_classes=num_classes)
    return SimpleNamespace(
        model=model, _train_loop=train, _val_loop=val, _test_loop=test)


def test_fitting_splits_pass():
    runner = _runner(
        train=_Loop(_Split(10)), val=_Loop(_Split(10), format_only=False))
    DatasetCheckHook().before_run(runner)


@pytest.mark.parametrize('split', ['train', 'val', 'test'])
@pytest.mark.parametrize('dataset_classes', [3, 12])
def test_class_count_mismatch_names_both_numbers_and_keys(
        split, dataset_classes):
    runner = _runner(num_classes=10, **{split: _Loop(_Split(dataset_classes))})
    with pytest.raises(DatasetModelMismatchError) as error:
        DatasetCheckHook().before_run(runner)
    message = str(error.value)
    assert f'{split}_dataloader.dataset' in message
    assert f'{dataset_classes}_classes.json' in message
    assert f'has {dataset_classes} classes' in message
    assert 'model.bbox_head.num_classes=10' in message
    assert f'set model.bbox_head.num_classes={dataset_classes}' in message
    assert f'{split}_dataloader.dataset.metainfo.classes' in message


def test_unbuilt_loops_and_models_without_a_head_are_skipped():
    # The runner builds the test loop only in test(): as a config dict it
    # is not checked, nor is a model without bbox_head.num_classes.
    DatasetCheckHook().before_run(
        _runner(train=_Loop(_Split(10)), test=dict(type='TestLoop')))
    runner = _runner(train=_Loop(_Split(3)))
    runner.model = torch.nn.Linear(2, 2)
    DatasetCheckHook().before_run(runner)


def test_wrapped_model_is_unwrapped():
    from mmengine.model import MMDistributedDataParallel
    inner = torch.nn.Linear(2, 2)
    inner.bbox_head = SimpleNamespace(num_classes=4)
    wrapper = MMDistributedDataParallel.__new__(MMDistributedDataParallel)
    torch.nn.Module.__init__(wrapper)
    wrapper.module = inner
    runner = _runner(train=_Loop(_Split(3)))
    runner.model = wrapper
    with pytest.raises(DatasetModelMismatchError, match='num_classes=4'):
        DatasetCheckHook().before_run(runner)


def test_split_without_annotations_needs_format_only():
    unannotated = _Split(10, num_instances=0)
    with pytest.raises(
            DatasetModelMismatchError,
            match=r'test_dataloader.dataset .* no annotations.* '
            r'test_evaluator.format_only=True'):
        DatasetCheckHook().before_run(
            _runner(test=_Loop(unannotated, format_only=False)))
    # Predictions only: nothing is evaluated, nothing to stop.
    DatasetCheckHook().before_run(
        _runner(test=_Loop(unannotated, format_only=True)))


@pytest.mark.parametrize('splits', ['train', ['train', 'trian']])
def test_bad_splits_fail_at_construction(splits):
    with pytest.raises(ValueError, match='splits must be a list'):
        DatasetCheckHook(splits=splits)


def test_plugin_configs_carry_the_hook():
    from mmengine.config import Config
    cfg = Config.fromfile(
        repo_path('configs', 'toy', 'deformable-detr_toy.py'))
    assert cfg.default_hooks.dataset_check.type == (
        'ddetr_plugin.DatasetCheckHook')
