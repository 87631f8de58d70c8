"""Training with a config inheriting mmdet's, through tools/train.py.

The config is mmdet's tiny Deformable DETR config plus the plugin's two
lines, on 3 toy classes: the route of a user of mmdet's configs.

Fine-tuning: an 80-class checkpoint (COCO's class count) given as
``load_from`` trains: every weight but the head's classification layers
(weights and biases) is loaded, those start from their initial values, and
the log names them once, without MMEngine's mismatch message. The same
checkpoint given to ``--resume`` is refused before any step: a resumed run
must be the same model. Both layouts are covered, the plugin's and
MMDetection 3.x's (converted in memory).

mmdet's ``default_hooks`` lack the plugin's ``DatasetCheckHook``; the
plugin's detector still stops a model of another class count at the first
step, instead of after an epoch in ``CocoMetric``.
"""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MessageHub
from mmengine.registry import DefaultScope

from ddetr_plugin.converters import CheckpointMismatchError
from ddetr_plugin.converters.in_memory import convert_for_model
from ddetr_plugin.engine import DatasetModelMismatchError
from testkit import load_script

COCO_CLASSES = 80
# Two images, batch size 2: one training iteration.
ONE_ITERATION = [
    '--cfg-options', 'train_dataloader.dataset.indices=2',
    'optim_wrapper.optimizer.lr=0.0'
]
CLASS_LAYERS = ('bbox_head.cls_branches.0.weight',
                'bbox_head.cls_branches.0.bias')
MMENGINE_MISMATCH = 'do not match exactly'

# The tool's main() in this process: its code path from the command line
# on, without a second start-up of mmdet (seconds per run).
train_tool = load_script('tools/train.py', 'train_tool')


def _train(argv, capfd):
    """Run tools/train.py with ``argv``; returns (the exception it raised
    or None, what it printed)."""
    capfd.readouterr()
    try:
        train_tool.main(argv)
        error = None
    except Exception as caught:  # the test says which it expects
        error = caught
    captured = capfd.readouterr()
    return error, captured.out + captured.err


@pytest.fixture(scope='module')
def setup(helpers, toy_data, tmp_path_factory):
    """The 3-class config (mmdet's tiny config plus the plugin's lines)
    and an 80-class checkpoint of its model in each layout."""
    folder = tmp_path_factory.mktemp('fine_tuning')
    classes = helpers.toy_classes(toy_data)[:3]
    config = helpers.write_mmdet_tiny_config(
        str(folder), toy_data, 'three.py', plugin=True, classes=classes)
    checkpoints = {}
    for layout, scope in (('plugin', 'ddetr_plugin'), ('mmdet', 'mmdet')):
        model_cfg = Config.fromfile(config).model
        model_cfg.pop('_scope_')
        model_cfg.bbox_head.num_classes = COCO_CLASSES
        with DefaultScope.overwrite_default_scope(scope):
            from mmengine.registry import MODELS
            model = MODELS.build(model_cfg)
        model.init_weights()
        state = model.state_dict()
        # Distinct values, so that loaded class rows could not pass as
        # initial ones.
        for key in state:
            if 'cls_branches' in key:
                state[key] = torch.full_like(state[key], 7.0)
        path = str(folder / f'coco_{layout}.pth')
        torch.save(dict(state_dict=state, meta=dict(epoch=50)), path)
        checkpoints[layout] = (path, state)
    return config, len(classes), checkpoints


def _fresh_model(config: str):
    """The 3-class model as the run builds and initialises it."""
    from ddetr_plugin.registry import MODELS
    model_cfg = Config.fromfile(config).model
    model_cfg.pop('_scope_')
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        model = MODELS.build(model_cfg)
    model.init_weights()
    return model


@pytest.mark.parametrize('layout', ['plugin', 'mmdet'])
def test_load_from_fine_tunes_on_other_classes(setup, layout, tmp_path, capfd):
    config, num_classes, checkpoints = setup
    path, saved = checkpoints[layout]
    work_dir = str(tmp_path / 'work')
    error, output = _train([config, '--work-dir', work_dir] + ONE_ITERATION +
                           [f'load_from={path}'], capfd)
    assert error is None, output[-3000:]
    assert 'Epoch(train) [1][1/1]' in output
    # One warning names the class layers, biases included; MMEngine's
    # message, which would call them an error to fix, is not printed.
    warning = output[output.index('the classification layers differ'):]
    warning = warning[:warning.index('\n')]
    for key in CLASS_LAYERS:
        assert key in warning
    assert MMENGINE_MISMATCH not in output
    trained = torch.load(
        osp.join(work_dir, 'epoch_1.pth'), weights_only=False)['state_dict']
    # lr=0: the saved weights are those the run started from.
    model = _fresh_model(config)
    fresh_bias = model.state_dict()['bbox_head.cls_branches.0.bias']
    assert fresh_bias.shape == (num_classes, )
    assert torch.equal(trained['bbox_head.cls_branches.0.bias'], fresh_bias)
    assert trained['bbox_head.cls_branches.0.weight'].shape[0] == num_classes
    assert not (trained['bbox_head.cls_branches.0.weight'] == 7.0).any()
    # Every other parameter as saved (mmdet's names converted).
    expected, _ = convert_for_model(saved, model, True)
    loaded = [
        key for key in expected if 'cls_branches' not in key
        and 'running_' not in key and 'num_batches_tracked' not in key
    ]
    assert len(loaded) > 50
    for key in loaded:
        assert torch.equal(trained[key], expected[key]), key


@pytest.mark.parametrize('layout', ['plugin', 'mmdet'])
def test_resume_with_other_classes_is_refused_before_any_step(
        setup, layout, tmp_path, capfd):
    config, _, checkpoints = setup
    path, _ = checkpoints[layout]
    error, output = _train(
        [config, '--work-dir',
         str(tmp_path / 'work'), '--resume', path] + ONE_ITERATION, capfd)
    assert isinstance(error, CheckpointMismatchError), output[-3000:]
    assert 'cls_branches' in str(error)
    assert 'Epoch(' not in output


def test_class_count_mismatch_stops_before_the_first_step(
        setup, tmp_path, capfd):
    config, num_classes, _ = setup
    error, output = _train(
        [config, '--work-dir', str(tmp_path / 'work')] + ONE_ITERATION +
        [f'model.bbox_head.num_classes={COCO_CLASSES}'], capfd)
    assert isinstance(error, DatasetModelMismatchError), output[-3000:]
    message = str(error)
    assert f'has {num_classes} classes' in message
    assert f'model.bbox_head.num_classes={COCO_CLASSES}' in message
    assert f'set model.bbox_head.num_classes={num_classes}' in message
    assert 'Epoch(' not in output
    # No training loop is left running for later models of the process.
    assert MessageHub.get_current_instance().get_info('loop_stage') is None
