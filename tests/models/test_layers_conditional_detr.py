"""Conditional DETR's layers and head, by their defining properties."""
import pytest
import torch

from ddetr_plugin.models.dense_heads import ConditionalDETRHead
from ddetr_plugin.models.layers import (ConditionalAttention,
                                        ConditionalDetrDecoder,
                                        ConditionalDetrTransformer,
                                        SinePositionalEncoding,
                                        point_positional_encoding)

EMBED_DIMS = 32


def _decoder(num_layers=2):
    attention = dict(embed_dims=EMBED_DIMS, num_heads=4)
    return ConditionalDetrDecoder(
        num_layers=num_layers,
        layer_cfg=dict(
            self_attn_cfg=attention,
            cross_attn_cfg=attention,
            ffn_cfg=dict(embed_dims=EMBED_DIMS, feedforward_channels=64)))


def test_point_encoding_is_the_map_encoding_at_pixel_positions():
    height, width = 5, 7
    encoding = SinePositionalEncoding(
        num_feats=EMBED_DIMS // 2, normalize=True, eps=0.0)
    maps = encoding(torch.zeros(1, height, width, dtype=torch.bool))
    # With offset 0 the last pixel of a row sits at 1, the first at 1/w.
    ys, xs = torch.meshgrid(
        torch.arange(1, height + 1) / height,
        torch.arange(1, width + 1) / width,
        indexing='ij')
    points = torch.stack([xs, ys], dim=-1)
    encoded = point_positional_encoding(points, num_feats=EMBED_DIMS // 2)
    torch.testing.assert_close(encoded.permute(2, 0, 1), maps[0])


def test_point_encoding_refuses_boxes():
    with pytest.raises(ValueError, match=r'\(\.\.\., 2\) points'):
        point_positional_encoding(torch.rand(3, 4))


def test_cross_attention_ignores_padded_keys():
    torch.manual_seed(0)
    attention = ConditionalAttention(
        EMBED_DIMS, 4, cross_attn=True, is_first=True).eval()
    query, query_pos, sine = torch.randn(3, 2, 6, EMBED_DIMS).unbind(0)
    memory, memory_pos = torch.randn(2, 2, 10, EMBED_DIMS).unbind(0)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 7:] = True
    output = attention(query, query_pos, memory, memory_pos, mask, sine)
    changed = memory.clone()
    changed[0, 7:] += 5.0
    moved = attention(query, query_pos, changed, memory_pos, mask, sine)
    torch.testing.assert_close(moved, output)
    # Without the mask the same change does reach the queries.
    unmasked = attention(query, query_pos, changed, memory_pos, None, sine)
    assert not torch.allclose(unmasked[0], output[0], atol=1e-3)


def test_cross_attention_matches_content_plus_spatial_scores():
    """One head: the attention weight is softmax((c_q.c_k + p_q.p_k) /
    sqrt(2 d)) over keys, the value the projected content."""
    torch.manual_seed(1)
    dims = 8
    attention = ConditionalAttention(dims, 1, cross_attn=True).eval()
    query, query_pos, sine = torch.randn(3, 1, 3, dims).unbind(0)
    memory, memory_pos = torch.randn(2, 1, 5, dims).unbind(0)
    output = attention(query, query_pos, memory, memory_pos, None, sine)
    content = attention.query_content_proj(query) @ \
        attention.key_content_proj(memory).transpose(1, 2)
    spatial = attention.query_sine_proj(sine) @ \
        attention.key_pos_proj(memory_pos).transpose(1, 2)
    weights = ((content + spatial) / (2 * dims)**0.5).softmax(-1)
    expected = query + attention.out_proj(
        weights @ attention.value_proj(memory))
    torch.testing.assert_close(output, expected)


def test_only_later_layers_scale_the_spatial_query():
    torch.manual_seed(2)
    decoder = _decoder().eval()
    query_pos = torch.randn(2, 6, EMBED_DIMS)
    memory, memory_pos = torch.randn(2, 2, 9, EMBED_DIMS).unbind(0)
    inputs = (torch.zeros_like(query_pos), query_pos, memory, memory_pos, None)
    hidden_states, references = decoder(*inputs)
    assert hidden_states.shape == (2, 2, 6, EMBED_DIMS)
    assert references.shape == (2, 6, 2)
    assert ((references > 0) & (references < 1)).all()
    with torch.no_grad():
        decoder.query_scale[-1].bias.add_(1.0)
    changed, _ = decoder(*inputs)
    # lambda_q is the identity in the first layer, a learnt scale after.
    torch.testing.assert_close(changed[0], hidden_states[0])
    assert not torch.allclose(changed[1], hidden_states[1], atol=1e-3)


def test_decoder_refuses_a_missing_final_norm():
    with pytest.raises(ValueError, match='post_norm_cfg'):
        ConditionalDetrDecoder(num_layers=1, post_norm_cfg=None)


def _transformer():
    attention = dict(embed_dims=EMBED_DIMS, num_heads=4)
    ffn = dict(embed_dims=EMBED_DIMS, feedforward_channels=64)
    return ConditionalDetrTransformer(
        encoder=dict(
            num_layers=1, layer_cfg=dict(self_attn_cfg=attention,
                                         ffn_cfg=ffn)),
        decoder=dict(
            num_layers=2,
            layer_cfg=dict(
                self_attn_cfg=attention, cross_attn_cfg=attention,
                ffn_cfg=ffn)),
        positional_encoding=dict(num_feats=EMBED_DIMS // 2, normalize=True),
        num_queries=5).eval()


def test_transformer_masks_padding_like_an_unpadded_map():
    """A padded image gives the queries what the same image unpadded
    gives: the padding is masked and the positions count valid pixels."""
    torch.manual_seed(3)
    transformer = _transformer()
    feature = torch.randn(1, EMBED_DIMS, 4, 5)
    padded = torch.randn(1, EMBED_DIMS, 6, 8)
    padded[..., :4, :5] = feature
    mask = torch.ones(1, 6, 8, dtype=torch.bool)
    mask[:, :4, :5] = False
    with torch.no_grad():
        alone, references = transformer(feature, None)
        together, padded_references = transformer(padded, mask)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded_references, references)


def test_transformer_exports_with_dynamic_sizes():
    """No Python branch on tensor values: one exported program serves any
    batch and map size."""
    torch.manual_seed(5)
    transformer = _transformer()
    batch, height, width = (
        torch.export.Dim(name, min=2, max=64)
        for name in ('batch', 'height', 'width'))
    program = torch.export.export(
        transformer, (torch.randn(2, EMBED_DIMS, 6, 7), None),
        dynamic_shapes=({
            0: batch,
            2: height,
            3: width
        }, None))
    other = torch.randn(3, EMBED_DIMS, 9, 5)
    with torch.no_grad():
        for got, want in zip(program.module()(other, None),
                             transformer(other, None)):
            torch.testing.assert_close(got, want)


def _head():
    return ConditionalDETRHead(num_classes=3, embed_dims=EMBED_DIMS)


def test_head_centres_start_from_the_reference_points():
    torch.manual_seed(4)
    head = _head()
    head.init_weights()
    with torch.no_grad():
        head.reg_branch[-1].weight.zero_()
        head.reg_branch[-1].bias.zero_()
    hidden_states = torch.randn(3, 2, 5, EMBED_DIMS)
    references = torch.rand(2, 5, 2) * 0.8 + 0.1
    scores, boxes = head(hidden_states, references)
    assert scores.shape == (3, 2, 5, 3) and boxes.shape == (3, 2, 5, 4)
    # A zero delta puts every layer's box centre on the query's point.
    torch.testing.assert_close(boxes[..., :2],
                               references.expand(3, -1, -1, -1))
    torch.testing.assert_close(boxes[..., 2:],
                               torch.full_like(boxes[..., 2:], 0.5))
    # The prior of the focal loss: every class starts at 1%.
    torch.testing.assert_close(
        scores.sigmoid().mean(), torch.tensor(0.01), atol=0.03, rtol=0)


def test_head_explains_a_91_class_checkpoint():
    head = _head()
    state = head.state_dict()
    state['cls_branch.weight'] = torch.zeros(91, EMBED_DIMS)
    state['cls_branch.bias'] = torch.zeros(91)
    with pytest.raises(RuntimeError, match='official_to_plugin.py'):
        head.load_state_dict(state)
