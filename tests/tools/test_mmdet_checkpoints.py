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
import json
import os.path as osp
import re

import mmdet
import pytest
import torch

pytestmark = pytest.mark.slow

MMDET_TOOLS = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools')
CONVERTED_LINE = ('Loaded a checkpoint in the layout of MMDetection 3.x\'s '
                  'Deformable DETR: {what} converted in memory')

# mmdet's config, shrunk to toy size, in mmdet's scope: the header, the
# model (here mmdet's refinement variant) and the toy data and schedule.
MMDET_TINY = '''
_base_ = {base!r}
# Only so that mmdet's tools can read MMEngine checkpoints on torch >= 2.6
# (weights-only loading); without _scope_ the model stays mmdet's.
custom_imports = dict(imports=['ddetr_plugin'], allow_failed_imports=False)
data_root = {data_root!r}
classes = {classes!r}
{model}pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                          'img_shape', 'scale_factor'))
]
split = dict(data_root=data_root, metainfo=dict(classes=classes),
             pipeline=pipeline)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    batch_sampler=None,
    dataset=dict(split, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=False)))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(split, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-3))
train_cfg = dict(max_epochs={max_epochs}, val_interval=10)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
'''
MMDET_TINY_MODEL = '''
layer = dict(embed_dims=32, num_heads=2, dropout=0.0)
ffn = dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0)
model = dict(
    num_queries=10,
    data_preprocessor=dict(mean=[127.5] * 3, std=[64.0] * 3),
    backbone=dict(depth=18, base_channels=8, frozen_stages=-1,
                  norm_cfg=dict(requires_grad=True), norm_eval=False,
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64], out_channels=32,
              norm_cfg=dict(num_groups=8)),
    encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=layer,
                                              ffn_cfg=ffn)),
    decoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=layer,
                                              cross_attn_cfg=layer,
                                              ffn_cfg=ffn)),
    positional_encoding=dict(num_feats=16),
    bbox_head=dict(num_classes=len(classes), embed_dims=32))
'''
# Box refinement: mmdet's two-stage variant only fits 256 channels.
MMDET_BASE = ('mmdet::deformable_detr/'
              'deformable-detr-refine_r50_16xb2-50e_coco.py')
# mmdet's config plus the plugin's two lines.
PLUGIN_CONFIG = """_base_ = {base!r}
custom_imports = dict(imports=['ddetr_plugin'], allow_failed_imports=False)
model = dict(_scope_='ddetr_plugin')
"""


def _classes(toy_data):
    with open(osp.join(toy_data, 'annotations', 'instances_val.json')) as f:
        return tuple(category['name']
                     for category in json.load(f)['categories'])


def _write(folder,
           toy_data,
           name,
           max_epochs=1,
           plugin=False,
           base=MMDET_BASE,
           model=MMDET_TINY_MODEL):
    """mmdet's tiny config (``base`` shrunk by ``model``); with ``plugin``,
    a config inheriting it and adding only the plugin's two lines."""
    path = osp.join(folder, name)
    mmdet_path = path[:-3] + '_mmdet.py' if plugin else path
    with open(mmdet_path, 'w') as file:
        file.write(
            MMDET_TINY.format(
                base=base,
                model=model,
                data_root=toy_data.rstrip('/') + '/',
                classes=_classes(toy_data),
                max_epochs=max_epochs))
    if plugin:
        with open(path, 'w') as file:
            file.write(PLUGIN_CONFIG.format(base=mmdet_path))
    return path


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
    config = _write(folder, toy_data, 'mmdet_tiny.py')
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
    config = _write(folder, toy_data, 'plugin_tiny.py', plugin=True)
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
    config = _write(
        str(tmp_path), toy_data, 'plugin_tiny.py', max_epochs=2, plugin=True)
    resumed = resume_with_plugin(helpers, config, str(tmp_path / 'resume'),
                                 checkpoint)
    assert CONVERTED_LINE.format(what='weights and optimizer state') in resumed
