"""The plugin's Conditional DETR computes what mmdet 3.3.0's computes.

mmdet's model is built from mmdet's own config file and the plugin's from
the plugin's config, both shrunk the same way (a ResNet-18 of width 16,
two encoder and two decoder layers, so that the decoder's first layer and
a later one are both covered, no dropout, small images; 256 channels,
which mmdet's reference-point encoding fixes). mmdet's random weights are
loaded into the plugin's model through ``convert_mmdet_state_dict`` with
strict loading; predictions, the raw outputs of every decoder layer, every
loss term and every gradient must then agree in float32, on a batch of two
images of different sizes (the padding masks matter).

The plugin's model is also built from a config that inherits mmdet's
config file and adds only the plugin's two lines, in mmdet's scope; mmdet's
state dict then loads into it as it is, renamed in memory.
"""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import (CheckpointMismatchError, check_state_dict,
                                     convert_mmdet_state_dict, load_converted)
from ddetr_plugin.converters.layouts import foreign_layout
from testkit import PLUGIN_LINES, REPO, load_script, mmdet_mim

pytest.importorskip('scipy')

HERE = osp.dirname(osp.abspath(__file__))

MMDET_CONFIG = mmdet_mim('configs', 'conditional_detr',
                         'conditional-detr_r50_8xb2-50e_coco.py')
PLUGIN_CONFIG = osp.join(REPO, 'configs', 'conditional_detr',
                         'conditional-detr_r50_8xb2-50e_coco.py')


def _load_deformable_parity():
    """The Deformable DETR parity tests' batch and comparison helpers."""
    return load_script(
        osp.join(HERE, 'test_parity_mmdet.py'), 'deformable_parity')


parity = _load_deformable_parity()


def shrink(model_cfg, plugin: bool = False):
    """The same small model on both sides, without dropout."""
    model_cfg.num_queries = 20
    model_cfg.backbone.update(depth=18, base_channels=16, init_cfg=None)
    model_cfg.neck.in_channels = [128]
    transformer = model_cfg.transformer if plugin else model_cfg
    encoder, decoder = transformer.encoder, transformer.decoder
    encoder.num_layers = decoder.num_layers = 2
    encoder.layer_cfg.self_attn_cfg.dropout = 0.0
    decoder.layer_cfg.self_attn_cfg.attn_drop = 0.0
    decoder.layer_cfg.cross_attn_cfg.attn_drop = 0.0
    for layer_cfg in (encoder.layer_cfg, decoder.layer_cfg):
        layer_cfg.ffn_cfg.update(feedforward_channels=128, ffn_drop=0.0)
    return model_cfg


def build_plugin_pair():
    """mmdet's model and the plugin's (plugin config), mmdet's weights."""
    reference = parity.build_reference(MMDET_CONFIG, shrink, noise=0.1)
    plugin_cfg = shrink(Config.fromfile(PLUGIN_CONFIG).model, plugin=True)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        from ddetr_plugin.registry import MODELS
        plugin = MODELS.build(plugin_cfg)
    assert type(plugin).__module__.startswith('ddetr_plugin')
    assert type(reference).__name__ == 'ConditionalDETR'
    assert type(reference).__module__.startswith('mmdet')
    state = reference.state_dict()
    converted = convert_mmdet_state_dict(state)
    # Every tensor of mmdet's model has one place in the plugin's.
    assert len(converted) == len(state)
    load_converted(plugin, converted)
    return reference, plugin


def build_inheriting_pair(folder):
    """mmdet's model and the plugin's built from mmdet's config plus the
    plugin's two lines; mmdet's own state dict loaded as it is."""
    reference = parity.build_reference(MMDET_CONFIG, shrink, noise=0.1)
    path = folder / 'inheriting.py'
    path.write_text(
        PLUGIN_LINES.format(base='mmdet::conditional_detr/' +
                            osp.basename(MMDET_CONFIG)))
    cfg = Config.fromfile(str(path))
    assert cfg.default_scope == 'mmdet'
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        from mmdet.registry import MODELS as MMDET_MODELS
        plugin = MMDET_MODELS.build(shrink(cfg.model))
    layers = plugin.transformer.decoder.layers
    for built in (plugin, plugin.transformer.encoder, layers[0].cross_attn,
                  plugin.bbox_head, plugin.bbox_head.assigner):
        assert type(built).__module__.startswith('ddetr_plugin.'), built
    plugin.load_state_dict(reference.state_dict(), strict=True)
    return reference, plugin


@pytest.fixture(scope='module')
def plugin_pair():
    return build_plugin_pair()


def test_weights_have_the_plugin_layout(plugin_pair):
    _, plugin = plugin_pair
    keys = list(plugin.state_dict())
    # The plugin's own checkpoints are not mistaken for mmdet's.
    assert foreign_layout(keys) is None
    # Only the first decoder layer adds the positional query in its
    # cross-attention, as in the paper.
    layers = plugin.transformer.decoder.layers
    assert hasattr(layers[0].cross_attn, 'query_pos_proj')
    assert not hasattr(layers[1].cross_attn, 'query_pos_proj')


def test_predictions_match_mmdet(plugin_pair):
    # Boxes of a hundred pixels: float32 rounding reaches 1e-4 there.
    parity.assert_predictions_match(*plugin_pair, box_rtol=1e-5)


def test_every_layers_raw_outputs_match_mmdet(plugin_pair):
    reference, plugin = plugin_pair
    reference.eval()
    plugin.eval()
    data = parity.make_batch(reference, with_boxes=False, training=False)
    with torch.no_grad():
        expected = reference._forward(data['inputs'],
                                      copy.deepcopy(data['data_samples']))
        received = plugin._forward(data['inputs'],
                                   copy.deepcopy(data['data_samples']))
    assert len(received) == len(expected) == 2
    for want, got in zip(expected, received):
        # (num_decoder_layers, bs, num_queries, 80 or 4)
        assert got.shape == want.shape and got.shape[:3] == (2, 2, 20)
        torch.testing.assert_close(got, want, rtol=0, atol=parity.TOLERANCE)


def test_losses_and_gradients_match_mmdet(plugin_pair):
    reference, plugin = plugin_pair
    parity.assert_losses_match(reference, plugin, 'conditional')


def test_mmdet_config_with_two_lines_matches_mmdet(tmp_path):
    reference, plugin = build_inheriting_pair(tmp_path)
    parity.assert_predictions_match(reference, plugin, box_rtol=1e-5)
    parity.assert_losses_match(reference, plugin, 'conditional')


def test_weights_of_the_other_detector_are_named(plugin_pair):
    _, plugin = plugin_pair
    deformable = {
        'transformer.encoder.layers.0.self_attn.sampling_offsets.weight':
        torch.zeros(256, 256)
    }
    with pytest.raises(
            CheckpointMismatchError,
            match='holds DeformableDETR weights but the model is '
            'a ConditionalDETR: give a DeformableDETR config '
            r'\(configs/deformable_detr/'):
        check_state_dict(plugin, deformable)
