"""The plugin's Deformable DETR computes what mmdet 3.3.0's computes.

For each variant, mmdet's model is built from mmdet's own config and the
plugin's from the plugin's config, both shrunk the same way (ResNet-18, two
encoder and decoder layers, no dropout, small images). mmdet's random
weights are copied into the plugin's model through
``convert_mmdet_state_dict`` with strict loading; predictions and every loss
term must then agree to 1e-4 in float32.

The plugin's model is also built from a config that inherits mmdet's own
config file and adds only the plugin's two lines (``custom_imports`` and
``model = dict(_scope_='ddetr_plugin')``), in mmdet's default scope; mmdet's
state dict then loads into it as it is, renamed in memory.
"""
import copy
import os.path as osp

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import convert_mmdet_state_dict, load_converted
from ddetr_plugin.converters.in_memory import rename_for_model
from testkit import PLUGIN_LINES, REPO, build_in_mmdet_scope, mmdet_mim

pytest.importorskip('scipy')

MMDET_CONFIGS = mmdet_mim('configs', 'deformable_detr')
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


def shrink_tiny(model_cfg):
    """An mmdet-layout model config at toy size (one layer each), for the
    tests that build both models from mmdet's layout."""
    # mmdet's two-stage proposals embed positions with a fixed 128 features
    # per coordinate, which only fits 256 channels.
    dims = 256 if model_cfg.as_two_stage else 64
    model_cfg.num_queries = 20
    model_cfg.backbone.update(depth=18, base_channels=16, init_cfg=None)
    model_cfg.neck.update(
        in_channels=[32, 64, 128],
        out_channels=dims,
        norm_cfg=dict(type='GN', num_groups=8))
    attention = dict(embed_dims=dims, num_heads=4, dropout=0.0)
    ffn = dict(embed_dims=dims, feedforward_channels=128, ffn_drop=0.0)
    model_cfg.encoder.num_layers = model_cfg.decoder.num_layers = 1
    model_cfg.encoder.layer_cfg.self_attn_cfg.update(attention)
    model_cfg.encoder.layer_cfg.ffn_cfg.update(ffn)
    model_cfg.decoder.layer_cfg.self_attn_cfg.update(attention)
    model_cfg.decoder.layer_cfg.cross_attn_cfg.update(attention)
    model_cfg.decoder.layer_cfg.ffn_cfg.update(ffn)
    model_cfg.positional_encoding.num_feats = dims // 2
    model_cfg.bbox_head.embed_dims = dims
    return model_cfg


def build_reference(variant: str,
                    resize=lambda cfg: shrink(cfg, False),
                    noise: float = 0.02):
    """mmdet's shrunk model with perturbed random weights."""
    mmdet_cfg = resize(Config.fromfile(osp.join(MMDET_CONFIGS, variant)).model)
    torch.manual_seed(0)
    reference = build_in_mmdet_scope(mmdet_cfg)
    reference.init_weights()
    # Random perturbations make every parameter matter (the paper's init
    # zeroes the attention weights, for example).
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return reference


def build_pair(variant: str):
    """mmdet's model, the plugin's model, mmdet's weights in both."""
    reference = build_reference(variant)
    plugin_cfg = shrink(
        Config.fromfile(osp.join(PLUGIN_CONFIGS, variant)).model, True)
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


def build_from_mmdet_config(variant: str, folder):
    """mmdet's model, and the plugin's built from mmdet's config file plus
    the plugin's two lines, in mmdet's scope; mmdet's weights in both."""
    # Stronger perturbations spread the scores of the tiny model, whose
    # near-ties would otherwise swap places on rounding differences.
    reference = build_reference(variant, shrink_tiny, noise=0.1)
    path = folder / 'inheriting.py'
    path.write_text(
        PLUGIN_LINES.format(base=f'mmdet::deformable_detr/{variant}'))
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmdet'
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        from mmdet.registry import MODELS as MMDET_MODELS
        plugin = MMDET_MODELS.build(shrink_tiny(cfg.model))
    transformer = plugin.transformer
    for built in (plugin, transformer.encoder.layers[0].self_attn,
                  transformer.decoder.layers[0].cross_attn, plugin.bbox_head,
                  plugin.bbox_head.assigner,
                  plugin.bbox_head.assigner.match_costs[0]):
        assert type(built).__module__.startswith('ddetr_plugin.'), built
    # mmdet's own weights, as saved: renamed while loading, strictly.
    plugin.load_state_dict(reference.state_dict(), strict=True)
    return reference, plugin


def _assert_same_detections(expected, received, box_rtol: float) -> None:
    for want, got in zip(expected, received):
        want, got = want.pred_instances, got.pred_instances
        assert got.bboxes.shape == want.bboxes.shape
        torch.testing.assert_close(
            got.scores, want.scores, rtol=0, atol=TOLERANCE)
        assert torch.equal(got.labels, want.labels)
        torch.testing.assert_close(
            got.bboxes, want.bboxes, rtol=box_rtol, atol=TOLERANCE)


def assert_predictions_match(reference, plugin, box_rtol: float = 0.0):
    """The same detections from both models, on a padded batch.

    The plugin's detections are compared with its backbone as built (the
    models' parity, to ``box_rtol``). Its default CPU inference path, whose
    folded batch norms change the backbone's maps by float32 rounding, is
    compared on the raw outputs (every layer's logits and boxes) and the
    sorted scores: near-tied scores of these random models may swap places
    under such rounding, which would make a comparison in rank order fail
    for no fault.
    """
    reference.eval()
    plugin.eval()
    data = make_batch(reference, with_boxes=False, training=False)
    # Different image sizes: the padding masks must matter.
    assert data['inputs'].shape[-2:] == (128, 160)
    inference = plugin.backbone_inference
    assert inference.applies(plugin.backbone, data['inputs'])

    def run(method):
        return method(data['inputs'], copy.deepcopy(data['data_samples']))

    with torch.no_grad():
        expected = run(reference.predict)
        folded, folded_raw = run(plugin.predict), run(plugin._forward)
        assert inference.graph_of(plugin.backbone) is not None
        inference.enabled = False
        try:
            as_built, raw = run(plugin.predict), run(plugin._forward)
        finally:
            inference.enabled = True
    for want, got in zip(expected, as_built):
        want, got = want.pred_instances, got.pred_instances
        assert got.bboxes.shape == want.bboxes.shape
        torch.testing.assert_close(
            got.scores, want.scores, rtol=0, atol=TOLERANCE)
        assert torch.equal(got.labels, want.labels)
        torch.testing.assert_close(
            got.bboxes, want.bboxes, rtol=box_rtol, atol=TOLERANCE)
    for got, want in zip(folded_raw, raw):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=TOLERANCE)
    for got, want in zip(folded, expected):
        torch.testing.assert_close(
            got.pred_instances.scores.sort().values,
            want.pred_instances.scores.sort().values,
            rtol=0,
            atol=TOLERANCE)


@pytest.mark.parametrize('variant', VARIANTS)
def test_predictions_match_mmdet(variant):
    assert_predictions_match(*build_pair(variant))


def assert_losses_match(reference, plugin, variant):
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
    mmdet_parameters = dict(reference.named_parameters())
    names = rename_for_model(mmdet_parameters, plugin.state_dict())
    compared = 0
    for mmdet_name, parameter in mmdet_parameters.items():
        name = names[mmdet_name]
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
    # Backbone, neck, transformer and head: every layer got a gradient.
    assert compared > 50


@pytest.mark.parametrize('variant', VARIANTS)
def test_losses_match_mmdet(variant):
    assert_losses_match(*build_pair(variant), variant)


@pytest.mark.parametrize('variant', VARIANTS)
def test_mmdet_config_with_two_lines_matches_mmdet(variant, tmp_path):
    reference, plugin = build_from_mmdet_config(variant, tmp_path)
    # Boxes of a few hundred pixels: float32 rounding reaches 1e-4 there.
    assert_predictions_match(reference, plugin, box_rtol=1e-5)
    assert_losses_match(reference, plugin, variant)
