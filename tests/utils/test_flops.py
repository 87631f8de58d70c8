"""MMEngine's FLOP counter (mmdet's get_flops.py) counts the plugin's op.

The toy model is counted twice, with and without the op's formula; the
difference must be the formula summed over the encoder's and decoder's
deformable attentions, computed here from the model's sizes.
"""
import os.path as osp

import pytest
import torch
from mmengine.analysis import complexity_analysis, get_model_complexity_info
from mmengine.config import Config

import ddetr_plugin  # noqa: F401
from ddetr_plugin.ops import extension_loaded
from ddetr_plugin.registry import MODELS
from ddetr_plugin.utils.flops import OP_NAME, ms_deform_attn_flops

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'deformable-detr_toy.py')


def test_formula():
    # 2 images, 10 queries, 4 heads, 3 levels, 2 points, 16 channels:
    # 4 bilinear multiply-adds and 1 weighted sum per sampled channel.
    assert ms_deform_attn_flops(2, 10, 4, 3, 2, 16) == 2 * 10 * 4 * 3 * 2 * \
        16 * 5


def _count(model, inputs) -> int:
    return get_model_complexity_info(
        model, inputs=inputs, show_table=False, show_arch=False)['flops']


@pytest.mark.skipif(
    not extension_loaded(),
    reason='the plain-PyTorch fallback traces as grid_sampler, already '
    'counted by MMEngine')
def test_counted_flops_rise_by_the_formula(monkeypatch):
    cfg = Config.fromfile(TOY_CONFIG)
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).eval()
    height, width = 64, 64
    inputs = torch.rand(1, 3, height, width)
    counted = _count(model, inputs)
    monkeypatch.delitem(complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS,
                        OP_NAME)
    without_op = _count(model, inputs)

    transformer = model.transformer
    with torch.no_grad():
        features = model.extract_feat(inputs)
    num_keys = sum(feature.shape[-2] * feature.shape[-1]
                   for feature in features)
    expected = 0
    for layers, num_queries in ((transformer.encoder.layers, num_keys),
                                (transformer.decoder.layers,
                                 model.num_queries)):
        for layer in layers:
            attention = getattr(layer, 'cross_attn', layer.self_attn)
            expected += ms_deform_attn_flops(
                1, num_queries, attention.num_heads, attention.num_levels,
                attention.num_points,
                attention.embed_dims // attention.num_heads)
    assert counted - without_op == expected
    assert expected > 0
