"""MMEngine's FLOP counter (mmdet's get_flops.py) counts Conditional DETR's
dense attention.

Every attention of Conditional DETR (the encoder's, and the decoder's self-
and cross-attention) runs ``F.scaled_dot_product_attention``, which
MMEngine has no formula for. The toy model is counted with and without the
plugin's formula; the difference must be the formula summed over the
attention calls, computed here from the model's sizes, for two numbers of
queries and two widths.
"""
import os.path as osp

import pytest
import torch
from mmengine.analysis import (ActivationAnalyzer, FlopAnalyzer,
                               complexity_analysis, get_model_complexity_info)
from mmengine.config import Config

import ddetr_plugin  # noqa: F401
from ddetr_plugin.registry import MODELS
from ddetr_plugin.utils.flops import (DENSE_ATTENTION_OP_NAME,
                                      dense_attention_flops)
from testkit import REPO

TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'conditional-detr_toy.py')
# Non-square, so that a height/width swap would change the count.
INPUT_SHAPE = (1, 3, 64, 96)


def test_formula():
    # 2 images, 4 heads, 10 queries, 12 keys, 16 query/key and 8 value
    # channels per head: scores and weighted sum.
    assert dense_attention_flops(2, 4, 10, 12, 16, 8) == \
        2 * 4 * 10 * 12 * 16 + 2 * 4 * 10 * 12 * 8


def _toy_model(num_queries: int, embed_dims: int) -> torch.nn.Module:
    """The toy Conditional DETR with ``num_queries`` and ``embed_dims``."""
    model = Config.fromfile(TOY_CONFIG).model
    model.backbone.init_cfg = None
    model.num_queries = num_queries
    model.neck.out_channels = embed_dims
    model.bbox_head.embed_dims = embed_dims
    transformer = model.transformer
    transformer.positional_encoding.num_feats = embed_dims // 2
    layers = (transformer.encoder.layer_cfg, transformer.decoder.layer_cfg)
    for layer in layers:
        for name in ('self_attn_cfg', 'cross_attn_cfg', 'ffn_cfg'):
            if name in layer:
                layer[name].embed_dims = embed_dims
    return MODELS.build(model).eval()


def _attention_calls(model, inputs):
    """(num_heads, num_queries, num_keys, query_head_dims, value_head_dims)
    of every attention call, from the model's sizes: the encoder's
    queries and keys are the map's pixels; decoder self-attention is among
    the queries; cross-attention concatenates content and spatial parts,
    so its queries and keys have twice the values' channels per head."""
    with torch.no_grad():
        feature = model.extract_feat(inputs)[-1]
    num_pixels = feature.shape[-2] * feature.shape[-1]
    num_queries = model.num_queries
    transformer = model.transformer
    for layer in transformer.encoder.layers:
        heads = layer.self_attn.num_heads
        head_dims = layer.self_attn.embed_dim // heads
        yield heads, num_pixels, num_pixels, head_dims, head_dims
    for layer in transformer.decoder.layers:
        for attention, num_keys in ((layer.self_attn, num_queries),
                                    (layer.cross_attn, num_pixels)):
            heads = attention.num_heads
            head_dims = attention.embed_dims // heads
            query_head_dims = head_dims * (2 if attention.cross_attn else 1)
            yield heads, num_queries, num_keys, query_head_dims, head_dims


def _count(model, inputs) -> int:
    return get_model_complexity_info(
        model, inputs=inputs, show_table=False, show_arch=False)['flops']


@pytest.mark.parametrize('num_queries, embed_dims', [(50, 64), (20, 32)])
def test_counted_flops_rise_by_the_formula(monkeypatch, num_queries,
                                           embed_dims):
    model = _toy_model(num_queries, embed_dims)
    inputs = torch.rand(*INPUT_SHAPE)
    counted = _count(model, inputs)
    monkeypatch.delitem(complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS,
                        DENSE_ATTENTION_OP_NAME)
    without_attention = _count(model, inputs)

    calls = list(_attention_calls(model, inputs))
    # 2 encoder layers, 3 decoder layers of self- and cross-attention.
    assert len(calls) == 2 + 3 * 2
    expected = sum(dense_attention_flops(1, *call) for call in calls)
    assert expected > 0
    assert counted - without_attention == expected


def test_attention_is_supported_and_its_activations_counted(monkeypatch):
    model = _toy_model(20, 32)
    inputs = torch.rand(*INPUT_SHAPE)
    # MMEngine warns "Unsupported operator ..." for these.
    for analyzer_type in (FlopAnalyzer, ActivationAnalyzer):
        analyzer = analyzer_type(model, inputs)
        assert analyzer.total() > 0
        assert DENSE_ATTENTION_OP_NAME not in analyzer.unsupported_ops()
    counted = analyzer.total()
    monkeypatch.delitem(complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS,
                        DENSE_ATTENTION_OP_NAME)
    without_attention = ActivationAnalyzer(model, inputs).total()
    # One output vector of the values' channels per head, query and call.
    expected = sum(heads * num_queries * value_head_dims
                   for heads, num_queries, _, _, value_head_dims in
                   _attention_calls(model, inputs))
    assert counted - without_attention == expected
