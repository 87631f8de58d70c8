"""Conditional DETR through the tools, as Deformable DETR goes.

- The plugin's toy config trains a few iterations with ``tools/train.py``
  and is evaluated with ``tools/test.py``.
- mmdet's own ``tools/train.py`` trains mmdet's ConditionalDETR (a tiny
  one, from a config inheriting mmdet's config file) for one epoch; the
  same config plus the plugin's two lines then runs the plugin's model
  through the plugin's tools with mmdet's checkpoint as it is (test;
  ``--resume``: weights and optimizer state converted in memory), through
  ``mmdet_to_plugin.py`` and through ``DetInferencer`` (the same
  detections as mmdet's model).
- A class count that does not fit the data stops training before its first
  step.
"""
import glob
import os.path as osp
import re

import numpy as np
import pytest

from testkit import load_script

pytestmark = pytest.mark.slow

HERE = osp.dirname(osp.abspath(__file__))
TOY_CONFIG = 'configs/toy/conditional-detr_toy.py'


def _load_mmdet_checkpoint_tests():
    """The Deformable DETR mmdet-checkpoint tests' config writer."""
    return load_script(
        osp.join(HERE, 'test_mmdet_checkpoints.py'), 'mmdet_checkpoint_tests')


shared = _load_mmdet_checkpoint_tests()
MMDET_TOOLS = shared.MMDET_TOOLS
MMDET_BASE = 'mmdet::conditional_detr/conditional-detr_r50_8xb2-50e_coco.py'
# mmdet's Conditional DETR, shrunk; mmdet's reference-point encoding needs
# 256 channels.
MMDET_TINY_MODEL = """
ffn = dict(feedforward_channels=64, ffn_drop=0.0)
model = dict(
    num_queries=10,
    data_preprocessor=dict(mean=[127.5] * 3, std=[64.0] * 3),
    backbone=dict(depth=18, base_channels=8, frozen_stages=-1,
                  norm_cfg=dict(requires_grad=True), norm_eval=False,
                  init_cfg=None),
    neck=dict(in_channels=[64]),
    encoder=dict(num_layers=1, layer_cfg=dict(
        self_attn_cfg=dict(dropout=0.0), ffn_cfg=ffn)),
    decoder=dict(num_layers=2, layer_cfg=dict(
        self_attn_cfg=dict(attn_drop=0.0), cross_attn_cfg=dict(attn_drop=0.0),
        ffn_cfg=ffn)),
    bbox_head=dict(num_classes=len(classes)))
"""


def _write(helpers, folder, toy_data, name, max_epochs=1, plugin=False):
    """mmdet's tiny Conditional DETR config; with ``plugin``, a config
    inheriting it and adding only the plugin's two lines."""
    return helpers.write_mmdet_tiny_config(
        folder,
        toy_data,
        name,
        max_epochs,
        plugin,
        base=MMDET_BASE,
        model=MMDET_TINY_MODEL)


def _toy_options(toy_data, work_dir):
    """--cfg-options pointing the toy config at the test's few images."""
    root = toy_data.rstrip('/') + '/'
    options = ['--work-dir', work_dir, '--cfg-options']
    for split in ('train', 'val', 'test'):
        options += [
            f'{split}_dataloader.dataset.data_root={root}',
            f'{split}_dataloader.batch_size=4',
            f'{split}_dataloader.num_workers=0',
            f'{split}_dataloader.persistent_workers=False'
        ]
    for split in ('val', 'test'):
        options.append(f'{split}_evaluator.ann_file={root}'
                       'annotations/instances_val.json')
    return options + [
        'train_cfg.max_epochs=1', 'default_hooks.logger.interval=1'
    ]


def test_toy_config_trains_and_tests(helpers, toy_data, tmp_path):
    work_dir = str(tmp_path / 'work')
    trained = helpers.run_tool(['tools/train.py', TOY_CONFIG] +
                               _toy_options(toy_data, work_dir)).stdout
    # Eight images in batches of four: two steps, every loss term logged
    # with mmdet's names, for the last decoder layer and the others.
    steps = re.findall(r'Epoch\(train\) +\[1\]\[ *(\d)/2\]', trained)
    assert steps == ['1', '2'], trained[-3000:]
    for name in ('loss_cls', 'loss_bbox', 'loss_iou', 'd0.loss_cls',
                 'd1.loss_iou'):
        assert f' {name}: ' in trained
    checkpoint = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(checkpoint)
    tested = helpers.run_tool(['tools/test.py', TOY_CONFIG, checkpoint] +
                              _toy_options(toy_data, str(tmp_path /
                                                         'test'))).stdout
    assert 0 <= shared._bbox_map(tested) <= 1


def test_class_count_mismatch_stops_training_first(helpers, toy_data,
                                                   tmp_path):
    work_dir = tmp_path / 'work'
    result = helpers.run_tool(
        ['tools/train.py', TOY_CONFIG] +
        _toy_options(toy_data, str(work_dir)) +
        ['model.bbox_head.num_classes=3'],
        check=False)
    assert result.returncode != 0
    assert 'DatasetModelMismatchError' in result.stdout
    assert 'set model.bbox_head.num_classes=10' in result.stdout
    assert 'Epoch(' not in result.stdout
    assert not glob.glob(str(work_dir / '*.pth'))


@pytest.fixture(scope='module')
def mmdet_run(helpers, toy_data, tmp_path_factory):
    """Folder, mmdet's config and its one-epoch checkpoint (mmdet's
    layout, with mmdet's optimizer state)."""
    folder = str(tmp_path_factory.mktemp('mmdet_run'))
    config = _write(helpers, folder, toy_data, 'mmdet_tiny.py')
    return folder, config, shared.train_with_mmdet(helpers, folder, config,
                                                   'decoder.ref_point_head.')


def test_test_tool_takes_the_mmdet_checkpoint(helpers, toy_data, mmdet_run):
    folder, _, checkpoint = mmdet_run
    config = _write(helpers, folder, toy_data, 'plugin_tiny.py', plugin=True)
    result = helpers.run_tool([
        'tools/test.py', config, checkpoint, '--work-dir',
        osp.join(folder, 'plugin_test')
    ])
    # Renamed while loading, with one log line (the predictions equal
    # mmdet's: see the DetInferencer test below and
    # tests/models/test_parity_conditional_detr.py).
    assert result.stdout.count('converted in memory') == 1
    assert 0 <= shared._bbox_map(result.stdout) <= 1


def test_resume_takes_the_mmdet_checkpoint(helpers, toy_data, mmdet_run,
                                           tmp_path):
    _, _, checkpoint = mmdet_run
    config = _write(
        helpers,
        str(tmp_path),
        toy_data,
        'plugin_tiny.py',
        max_epochs=2,
        plugin=True)
    resumed = shared.resume_with_plugin(helpers, config,
                                        str(tmp_path / 'resume'), checkpoint)
    assert ('3.x\'s ConditionalDETR: weights and optimizer state converted '
            'in memory') in resumed


def test_converter_and_inferencer_take_the_mmdet_checkpoint(
        helpers, toy_data, mmdet_run, tmp_path):
    from mmdet.apis import DetInferencer
    folder, mmdet_config, checkpoint = mmdet_run
    config = _write(
        helpers, str(tmp_path), toy_data, 'plugin_tiny.py', plugin=True)
    converted = str(tmp_path / 'converted.pth')
    helpers.run_tool([
        'tools/model_converters/mmdet_to_plugin.py', checkpoint, converted,
        '--config', config, '--trust-input'
    ])
    image = np.random.default_rng(0).integers(
        0, 256, (96, 128, 3), dtype=np.uint8)
    results = {}
    for name, (model, weights) in dict(
            mmdet=(mmdet_config, checkpoint),
            plugin=(config, checkpoint),
            converted=(config, converted)).items():
        inferencer = DetInferencer(
            model=model, weights=weights, device='cpu', show_progress=False)
        assert type(inferencer.model).__module__.startswith(
            'mmdet' if name == 'mmdet' else 'ddetr_plugin'), name
        results[name] = inferencer(image)['predictions'][0]
    for name in ('plugin', 'converted'):
        assert results[name]['labels'] == results['mmdet']['labels']
        np.testing.assert_allclose(
            results[name]['scores'], results['mmdet']['scores'], atol=1e-4)
        np.testing.assert_allclose(
            results[name]['bboxes'], results['mmdet']['bboxes'], atol=1e-2)
