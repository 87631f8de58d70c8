"""MMEngine's FLOP counter (mmdet's get_flops.py) counts the plugin's op.

The toy model is counted twice, with and without the op's formula; the
difference must be the formula summed over the encoder's and decoder's
deformable attentions, computed here from the model's sizes.
"""
import os.path as osp

import pytest
import torch
from mmengine.analysis import (ActivationAnalyzer, complexity_analysis,
                               get_model_complexity_info)
from mmengine.config import Config

import ddetr_plugin  # noqa: F401
from ddetr_plugin.ops import extension_loaded
from ddetr_plugin.registry import MODELS
from ddetr_plugin.utils.flops import OP_NAME, ms_deform_attn_flops
from testkit import REPO

TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'deformable-detr_toy.py')


def test_formula():
    # 2 images, 10 queries, 4 heads, 3 levels, 2 points, 16 channels:
    # 4 bilinear multiply-adds and 1 weighted sum per sampled channel.
    assert ms_deform_attn_flops(2, 10, 4, 3, 2, 16) == 2 * 10 * 4 * 3 * 2 * \
        16 * 5


def _count(model, inputs) -> int:
    return get_model_complexity_info(
        model, inputs=inputs, show_table=False, show_arch=False)['flops']


needs_extension = pytest.mark.skipif(
    not extension_loaded(),
    reason='the plain-PyTorch fallback traces as grid_sampler, already '
    'counted by MMEngine')


def _toy_model():
    cfg = Config.fromfile(TOY_CONFIG)
    cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model).eval()


def _attentions(model, inputs):
    """(attention module, number of queries) of every encoder and decoder
    layer; the encoder's queries are the pixels of every feature level."""
    with torch.no_grad():
        features = model.extract_feat(inputs)
    num_keys = sum(feature.shape[-2] * feature.shape[-1]
                   for feature in features)
    transformer = model.transformer
    for layer in transformer.encoder.layers:
        yield layer.self_attn, num_keys
    for layer in transformer.decoder.layers:
        yield layer.cross_attn, model.num_queries


@needs_extension
def test_counted_flops_rise_by_the_formula(monkeypatch):
    model = _toy_model()
    height, width = 64, 64
    inputs = torch.rand(1, 3, height, width)
    counted = _count(model, inputs)
    monkeypatch.delitem(complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS,
                        OP_NAME)
    without_op = _count(model, inputs)

    expected = 0
    for attention, num_queries in _attentions(model, inputs):
        expected += ms_deform_attn_flops(
            1, num_queries, attention.num_heads, attention.num_levels,
            attention.num_points, attention.embed_dims // attention.num_heads)
    assert counted - without_op == expected
    assert expected > 0


@needs_extension
def test_activations_count_the_op_output(monkeypatch):
    model = _toy_model()
    # Non-square, so that a height/width swap would change the count.
    inputs = torch.rand(1, 3, 64, 96)
    analyzer = ActivationAnalyzer(model, inputs)
    counted = analyzer.total()
    # MMEngine warns "Unsupported operator ..." for these.
    assert OP_NAME not in analyzer.unsupported_ops()
    monkeypatch.delitem(complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS,
                        OP_NAME)
    without_op = ActivationAnalyzer(model, inputs).total()
    # One output vector of embed_dims per query and call.
    expected = sum(num_queries * attention.embed_dims
                   for attention, num_queries in _attentions(model, inputs))
    assert counted - without_op == expected
