"""MMDetection's configs and checkpoints work with the plugin unchanged.

mmdet's own ``tools/train.py`` trains mmdet's Deformable DETR (a tiny one,
from a config inheriting mmdet's own config file) for one epoch on toy
images. The same config plus the plugin's two lines then runs the plugin's
model through the plugin's tools, given mmdet's checkpoint as it is: test
(the same COCO metrics as mmdet's test.py) and ``--resume`` (weights and
optimizer state converted in memory, with one log line). ``load_from``
goes through the same loading as the test tool
(``tests/models/test_converter_mmdet.py`` loads mmdet weights through
MMEngine's loader).
"""
import os.path as osp
import re

import pytest
import torch

from testkit import mmdet_mim

pytestmark = pytest.mark.slow

MMDET_TOOLS = mmdet_mim('tools')
CONVERTED_LINE = ('Loaded a checkpoint in the layout of MMDetection 3.x\'s '
                  'DeformableDETR: {what} converted in memory')


def _bbox_map(output: str) -> float:
    match = re.search(r'coco/bbox_mAP: (-?[\d.]+)', output)
    assert match is not None, output[-3000:]
    return float(match.group(1))


def train_with_mmdet(helpers, folder, config, marker):
    """mmdet's tools/train.py for the epochs of ``config``; the path of the
    first epoch's checkpoint (mmdet's layout, with ``marker`` among its
    keys, and mmdet's optimizer state)."""
    work_dir = osp.join(folder, 'work')
    helpers.run_tool(
        [osp.join(MMDET_TOOLS, 'train.py'), config, '--work-dir', work_dir])
    checkpoint = osp.join(work_dir, 'epoch_1.pth')
    saved = torch.load(checkpoint, weights_only=False)
    assert any(key.startswith(marker) for key in saved['state_dict'])
    assert saved['optimizer']['state']
    return checkpoint


def resume_with_plugin(helpers, config, work_dir, checkpoint):
    """The plugin's tools/train.py resuming ``checkpoint`` for a second
    epoch; its output."""
    resumed = helpers.run_tool([
        'tools/train.py', config, '--work-dir', work_dir, '--resume',
        checkpoint
    ]).stdout
    assert 'resumed epoch: 1' in resumed
    assert osp.isfile(osp.join(work_dir, 'epoch_2.pth'))
    assert not osp.isfile(osp.join(work_dir, 'epoch_1.pth'))
    return resumed


@pytest.fixture(scope='module')
def mmdet_run(helpers, toy_data, tmp_path_factory):
    """Folder, mmdet's config and its one-epoch checkpoint."""
    folder = str(tmp_path_factory.mktemp('mmdet_run'))
    config = helpers.write_mmdet_tiny_config(folder, toy_data, 'mmdet_tiny.py')
    return folder, config, train_with_mmdet(helpers, folder, config,
                                            'encoder.layers.')


def test_test_tool_takes_the_mmdet_checkpoint(helpers, toy_data, mmdet_run):
    folder, mmdet_config, checkpoint = mmdet_run
    expected = _bbox_map(
        helpers.run_tool([
            osp.join(MMDET_TOOLS, 'test.py'), mmdet_config, checkpoint,
            '--work-dir',
            osp.join(folder, 'mmdet_test')
        ]).stdout)
    config = helpers.write_mmdet_tiny_config(
        folder, toy_data, 'plugin_tiny.py', plugin=True)
    result = helpers.run_tool([
        'tools/test.py', config, checkpoint, '--work-dir',
        osp.join(folder, 'plugin_test')
    ])
    assert result.stdout.count(CONVERTED_LINE.format(what='weights')) == 1
    # The plugin's model computes what mmdet's computes: the same metrics.
    assert _bbox_map(result.stdout) == pytest.approx(expected, abs=1e-3)


def test_resume_takes_the_mmdet_checkpoint(helpers, toy_data, mmdet_run,
                                           tmp_path):
    _, _, checkpoint = mmdet_run
    config = helpers.write_mmdet_tiny_config(
        str(tmp_path), toy_data, 'plugin_tiny.py', max_epochs=2, plugin=True)
    resumed = resume_with_plugin(helpers, config, str(tmp_path / 'resume'),
                                 checkpoint)
    assert CONVERTED_LINE.format(what='weights and optimizer state') in resumed
