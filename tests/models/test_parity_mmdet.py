"""The plugin's Deformable DETR computes what mmdet 3.3.0's computes.

For each variant, mmdet's model is built from mmdet's own config and the
plugin's from the plugin's config, both shrunk the same way (ResNet-18, two
encoder and decoder layers, no dropout, small images). mmdet's random
weights are copied into the plugin's model through
``convert_mmdet_state_dict`` with strict loading; predictions and every loss
term must then agree to 1e-4 in float32.
"""
import copy
import os.path as osp

import mmdet
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import convert_mmdet_state_dict, load_converted

pytest.importorskip('scipy')

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MMDET_CONFIGS = osp.join(
    osp.dirname(mmdet.__file__), '.mim', 'configs', 'deformable_detr')
PLUGIN_CONFIGS = osp.join(REPO, 'configs', 'deformable_detr')
VARIANTS = [
    'deformable-detr_r50_16xb2-50e_coco.py',
    'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
]
TOLERANCE = 1e-4
NUM_QUERIES = 50


def _no_dropout_layers(model_cfg, transformer_cfg) -> None:
    """Two layers each, no dropout, in an mmdet-style encoder/decoder."""
    encoder, decoder = transformer_cfg.encoder, transformer_cfg.decoder
    encoder.num_layers = decoder.num_layers = 2
    encoder.layer_cfg.self_attn_cfg.dropout = 0.0
    encoder.layer_cfg.ffn_cfg.ffn_drop = 0.0
    decoder.layer_cfg.self_attn_cfg.dropout = 0.0
    decoder.layer_cfg.cross_attn_cfg.dropout = 0.0
    decoder.layer_cfg.ffn_cfg.ffn_drop = 0.0


def shrink(model_cfg, plugin: bool):
    """Make a model config small enough for CI, the same for both sides."""
    model_cfg.num_queries = NUM_QUERIES
    model_cfg.backbone.depth = 18
    model_cfg.backbone.init_cfg = None
    model_cfg.neck.in_channels = [128, 256, 512]
    _no_dropout_layers(model_cfg,
                       model_cfg.transformer if plugin else model_cfg)
    return model_cfg


def build_pair(variant: str):
    """mmdet's model, the plugin's model, mmdet's weights in both."""
    mmdet_cfg = shrink(
        Config.fromfile(osp.join(MMDET_CONFIGS, variant)).model, False)
    plugin_cfg = shrink(
        Config.fromfile(osp.join(PLUGIN_CONFIGS, variant)).model, True)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        from mmdet.registry import MODELS as MMDET_MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        reference = MMDET_MODELS.build(mmdet_cfg)
    reference.init_weights()
    # Random perturbations make every parameter matter (the paper's init
    # zeroes the attention weights, for example).
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        from ddetr_plugin.registry import MODELS
        plugin = MODELS.build(plugin_cfg)
    assert type(plugin).__module__.startswith('ddetr_plugin')
    assert type(reference).__module__.startswith('mmdet')
    load_converted(plugin, convert_mmdet_state_dict(reference.state_dict()))
    return reference, plugin


def make_batch(model, with_boxes: bool, training: bool):
    """Two images of different sizes through the model's preprocessor."""
    generator = torch.Generator().manual_seed(1)
    sizes = [(128, 160), (96, 136)]
    inputs, samples = [], []
    for index, (height, width) in enumerate(sizes):
        inputs.append(
            torch.randint(0, 256, (3, height, width),
                          generator=generator).to(torch.uint8))
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(height, width),
                ori_shape=(height, width),
                scale_factor=(1.0, 1.0)))
        instances = InstanceData()
        if with_boxes and index == 0:
            instances.bboxes = torch.tensor([[10., 20., 60., 90.],
                                             [70., 5., 150., 40.],
                                             [30., 30., 31., 100.]])
            instances.labels = torch.tensor([3, 17, 3])
        else:
            # The second image has no objects at all.
            instances.bboxes = torch.zeros((0, 4))
            instances.labels = torch.zeros((0, ), dtype=torch.long)
        sample.gt_instances = instances
        samples.append(sample)
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training)


@pytest.mark.parametrize('variant', VARIANTS)
def test_predictions_match_mmdet(variant):
    reference, plugin = build_pair(variant)
    reference.eval()
    plugin.eval()
    data = make_batch(reference, with_boxes=False, training=False)
    # Different image sizes: the padding masks must matter.
    assert data['inputs'].shape[-2:] == (128, 160)
    with torch.no_grad():
        expected = reference.predict(data['inputs'],
                                     copy.deepcopy(data['data_samples']))
        received = plugin.predict(data['inputs'],
                                  copy.deepcopy(data['data_samples']))
    for want, got in zip(expected, received):
        want, got = want.pred_instances, got.pred_instances
        assert got.bboxes.shape == want.bboxes.shape
        torch.testing.assert_close(
            got.scores, want.scores, rtol=0, atol=TOLERANCE)
        assert torch.equal(got.labels, want.labels)
        torch.testing.assert_close(
            got.bboxes, want.bboxes, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize('variant', VARIANTS)
def test_losses_match_mmdet(variant):
    reference, plugin = build_pair(variant)
    reference.train()
    plugin.train()
    data = make_batch(reference, with_boxes=True, training=True)
    expected = reference.loss(data['inputs'],
                              copy.deepcopy(data['data_samples']))
    received = plugin.loss(data['inputs'], copy.deepcopy(data['data_samples']))
    assert sorted(received) == sorted(expected)
    if 'twostage' in variant:
        assert 'enc_loss_cls' in received
    for name, want in expected.items():
        assert torch.isfinite(want).all(), name
        # mmdet's classification loss has shape (1,), a scalar is as good.
        torch.testing.assert_close(
            received[name].reshape(-1),
            want.reshape(-1),
            rtol=0,
            atol=TOLERANCE,
            msg=lambda message, name=name: f'{name}: {message}')
    # Training follows the same path: every gradient agrees too.
    sum(expected.values()).backward()
    sum(received.values()).backward()
    plugin_parameters = dict(plugin.named_parameters())
    renamed = convert_mmdet_state_dict(dict(reference.named_parameters()))
    compared = 0
    for name, parameter in renamed.items():
        if not isinstance(parameter, torch.nn.Parameter) or \
                parameter.grad is None:
            continue
        torch.testing.assert_close(
            plugin_parameters[name].grad,
            parameter.grad,
            rtol=TOLERANCE,
            atol=TOLERANCE,
            msg=lambda message, name=name: f'grad of {name}: {message}')
        compared += 1
    assert compared > 100
