"""The plugin's configs build the plugin's classes in every entry point.

MMDetection's ``DetInferencer`` runs in the ``mmdet`` scope whatever the
config says, where ``DeformableDETR``, ``HungarianAssigner`` and
``MultiScaleDeformableAttention`` name mmdet's (and mmcv's) classes. The
plugin's configs build their model in the plugin's scope (``_scope_`` of
``model``), so each entry point below must end with the plugin's classes,
nested ones included, and run. mmdet's own tools run from the installed
package (``mmdet/.mim/tools``), as a user of ``mim`` would run them.
"""
import os
import os.path as osp
import re

import pytest
import torch

from testkit import mmdet_mim

pytestmark = pytest.mark.slow

MMDET_TOOLS = mmdet_mim('tools')


def _plugin_classes(model) -> dict:
    """The classes whose scope matters, by role."""
    transformer = model.transformer
    return dict(
        detector=type(model),
        attention=type(transformer.encoder.layers[0].self_attn),
        cross_attention=type(transformer.decoder.layers[0].cross_attn),
        assigner=type(model.bbox_head.assigner),
        match_cost=type(model.bbox_head.assigner.match_costs[0]))


def _assert_plugin_model(model):
    for role, cls in _plugin_classes(model).items():
        assert cls.__module__.startswith('ddetr_plugin.'), (role, cls)


@pytest.fixture(scope='module')
def mmdet_trained(helpers, toy_data, tmp_path_factory):
    """(config, checkpoint) after one epoch of mmdet's own train.py."""
    folder = str(tmp_path_factory.mktemp('mmdet_tools'))
    config = helpers.write_tiny_config(
        folder, toy_data, max_epochs=1, val_interval=1)
    work_dir = osp.join(folder, 'work')
    result = helpers.run_tool(
        [osp.join(MMDET_TOOLS, 'train.py'), config, '--work-dir', work_dir])
    assert 'ddetr_plugin' in result.stdout  # the scope of the run
    checkpoint = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(checkpoint)
    return config, checkpoint


def _toy_image(toy_data) -> str:
    folder = osp.join(toy_data, 'val')
    return osp.join(folder, sorted(os.listdir(folder))[0])


@pytest.fixture
def test_hooks_importable(helpers, monkeypatch):
    """The tiny config imports tool_test_hooks, which lives beside us."""
    monkeypatch.syspath_prepend(osp.join(helpers.repo, 'tests', 'tools'))


def test_mmdet_train_and_test_tools(helpers, mmdet_trained, tmp_path):
    config, checkpoint = mmdet_trained
    state = torch.load(checkpoint, weights_only=False)['state_dict']
    # The plugin's layout: its transformer, not mmdet's top-level encoder.
    assert any(key.startswith('transformer.encoder.') for key in state)
    result = helpers.run_tool([
        osp.join(MMDET_TOOLS, 'test.py'), config, checkpoint, '--work-dir',
        str(tmp_path)
    ])
    match = re.search(r'coco/bbox_mAP: (-?[\d.]+)', result.stdout)
    assert match is not None, result.stdout[-3000:]
    assert 0 <= float(match.group(1)) <= 1


def test_det_inferencer_with_its_default_scope(mmdet_trained, toy_data,
                                               test_hooks_importable):
    from mmdet.apis import DetInferencer
    config, checkpoint = mmdet_trained
    inferencer = DetInferencer(model=config, weights=checkpoint, device='cpu')
    assert inferencer.scope == 'mmdet'
    _assert_plugin_model(inferencer.model)
    result = inferencer(_toy_image(toy_data), return_vis=False)
    predictions = result['predictions'][0]
    # test_cfg.max_per_img of the toy config, scores sorted.
    assert len(predictions['scores']) == 100
    assert predictions['scores'] == sorted(predictions['scores'], reverse=True)


def test_init_detector_and_inference_detector(mmdet_trained, toy_data,
                                              test_hooks_importable):
    from mmdet.apis import inference_detector, init_detector
    config, checkpoint = mmdet_trained
    model = init_detector(config, checkpoint, device='cpu')
    _assert_plugin_model(model)
    # The weights of the checkpoint, not a fresh initialisation.
    saved = torch.load(checkpoint, weights_only=False)['state_dict']
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    sample = inference_detector(model, _toy_image(toy_data))
    assert len(sample.pred_instances.scores) == 100


def test_mmdet_get_flops_tool(helpers, mmdet_trained):
    config, _ = mmdet_trained
    result = helpers.run_tool([
        osp.join(MMDET_TOOLS, 'analysis_tools', 'get_flops.py'), config,
        '--num-images', '2'
    ])
    match = re.search(r'Flops: ([\d.]+)([KMGT]?)', result.stdout)
    assert match is not None, result.stdout[-3000:]
    assert float(match.group(1)) > 0
