"""Class counts checked before the first step by the plugin's tools and by
MMDetection's own tools/test.py, through the plugin's configs."""
import glob
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from testkit import mmdet_mim

pytestmark = pytest.mark.slow

# The toy data has 10 classes; a model of 3 does not fit it.
MISMATCH = ['--cfg-options', 'model.bbox_head.num_classes=3']


def _assert_stopped_before_any_step(result, split):
    assert result.returncode != 0
    assert 'DatasetModelMismatchError' in result.stdout
    assert (f'{split}_dataloader.dataset (CheckedCocoDataset of '
            in result.stdout)
    assert 'has 10 classes' in result.stdout
    assert 'model.bbox_head.num_classes=3' in result.stdout
    assert 'set model.bbox_head.num_classes=10' in result.stdout
    # MMEngine logs every step as "Epoch(<mode>) [...]".
    assert 'Epoch(' not in result.stdout


def test_train_tool_stops_before_the_first_iteration(helpers, toy_data,
                                                     tmp_path):
    config = helpers.write_tiny_config(str(tmp_path), toy_data)
    work_dir = tmp_path / 'work'
    result = helpers.run_tool(
        ['tools/train.py', config, '--work-dir',
         str(work_dir)] + MISMATCH,
        check=False)
    _assert_stopped_before_any_step(result, 'train')
    assert not glob.glob(str(work_dir / '*.pth'))


@pytest.fixture
def three_class_checkpoint(helpers, toy_data, tmp_path):
    """(config, checkpoint) of the tiny model with 3 classes, untrained."""
    config = helpers.write_tiny_config(str(tmp_path), toy_data)
    model_cfg = Config.fromfile(config, import_custom_modules=False).model
    model_cfg.bbox_head.num_classes = 3
    import ddetr_plugin  # noqa: F401
    from ddetr_plugin.registry import MODELS
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        model = MODELS.build(model_cfg)
    checkpoint = str(tmp_path / 'three_classes.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict()), checkpoint)
    return config, checkpoint


def test_test_tool_stops_before_the_first_image(helpers,
                                                three_class_checkpoint,
                                                tmp_path):
    config, checkpoint = three_class_checkpoint
    result = helpers.run_tool(
        [
            'tools/test.py', config, checkpoint, '--work-dir',
            str(tmp_path / 'work')
        ] + MISMATCH,
        check=False)
    _assert_stopped_before_any_step(result, 'test')
    assert not osp.exists(tmp_path / 'work' / 'test_metrics.json')


def test_mmdet_test_tool_stops_before_the_first_image(helpers,
                                                      three_class_checkpoint,
                                                      tmp_path):
    mmdet_tool = mmdet_mim('tools', 'test.py')
    if not osp.isfile(mmdet_tool):
        pytest.skip(f'mmdet ships no {mmdet_tool}')
    config, checkpoint = three_class_checkpoint
    result = helpers.run_tool(
        [mmdet_tool, config, checkpoint, '--work-dir',
         str(tmp_path / 'work')] + MISMATCH,
        check=False)
    _assert_stopped_before_any_step(result, 'test')
