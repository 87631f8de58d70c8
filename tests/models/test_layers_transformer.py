"""Encoder, decoder, positional encoding and the transformer's stages."""
import math

import pytest
import torch

from ddetr_plugin.models.layers import DeformableDetrTransformer
from ddetr_plugin.models.layers.decoder import (DeformableDetrDecoder,
                                                inverse_sigmoid)
from ddetr_plugin.models.layers.encoder import DeformableDetrEncoder
from ddetr_plugin.models.layers.positional_encoding import (
    SinePositionalEncoding, proposal_positional_encoding)

EMBED_DIMS = 32


def attention_cfg(num_levels=2):
    return dict(
        embed_dims=EMBED_DIMS,
        num_heads=4,
        num_levels=num_levels,
        num_points=2,
        dropout=0.0)


def transformer(as_two_stage=False,
                num_levels=2,
                num_queries=6,
                decoder_levels=None) -> DeformableDetrTransformer:
    ffn = dict(embed_dims=EMBED_DIMS, feedforward_channels=64, ffn_drop=0.0)
    return DeformableDetrTransformer(
        encoder=dict(
            num_layers=2,
            layer_cfg=dict(
                self_attn_cfg=attention_cfg(num_levels), ffn_cfg=ffn)),
        decoder=dict(
            num_layers=2,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=EMBED_DIMS, num_heads=4, dropout=0.0),
                cross_attn_cfg=attention_cfg(decoder_levels or num_levels),
                ffn_cfg=ffn)),
        positional_encoding=dict(
            num_feats=EMBED_DIMS // 2, normalize=True, offset=-0.5),
        num_feature_levels=num_levels,
        num_queries=num_queries,
        as_two_stage=as_two_stage)


def features_and_masks(padded: bool):
    torch.manual_seed(0)
    features = [
        torch.randn(2, EMBED_DIMS, 8, 10),
        torch.randn(2, EMBED_DIMS, 4, 5)
    ]
    if not padded:
        return features, None
    masks = [torch.zeros(2, 8, 10, dtype=torch.bool)]
    masks[0][1, 6:, :] = True
    masks[0][1, :, 7:] = True
    masks.append(torch.zeros(2, 4, 5, dtype=torch.bool))
    masks[1][1, 3:, :] = True
    masks[1][1, :, 4:] = True
    return features, masks


def test_positional_encoding_ignores_padding():
    encoding = SinePositionalEncoding(num_feats=8)
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    padded = torch.ones(1, 7, 9, dtype=torch.bool)
    padded[:, :5, :6] = False
    torch.testing.assert_close(encoding(padded)[..., :5, :6], encoding(mask))


def test_positional_encoding_values():
    encoding = SinePositionalEncoding(num_feats=4, temperature=100)
    out = encoding(torch.zeros(1, 2, 3, dtype=torch.bool))
    assert out.shape == (1, 8, 2, 3)
    # y = 2 (second row, 1-based), x = 3; channels: y's first, then x's,
    # each (sin f0, cos f0, sin f1, cos f1) with f1 = 100 ** (2 / 4).
    y_channels = out[0, :4, 1, 2]
    x_channels = out[0, 4:, 1, 2]
    expected_y = torch.tensor(
        [math.sin(2),
         math.cos(2),
         math.sin(2 / 10),
         math.cos(2 / 10)])
    expected_x = torch.tensor(
        [math.sin(3),
         math.cos(3),
         math.sin(3 / 10),
         math.cos(3 / 10)])
    torch.testing.assert_close(y_channels, expected_y)
    torch.testing.assert_close(x_channels, expected_x)


def test_positional_encoding_matches_mmdet():
    layers = pytest.importorskip('mmdet.models.layers')
    theirs = layers.SinePositionalEncoding(
        num_feats=16, normalize=True, offset=-0.5)
    ours = SinePositionalEncoding(num_feats=16, normalize=True, offset=-0.5)
    _, masks = features_and_masks(padded=True)
    torch.testing.assert_close(ours(masks[0]), theirs(masks[0]))


def test_proposal_encoding_shape_and_order():
    proposals = torch.randn(2, 3, 4)
    encoded = proposal_positional_encoding(proposals, num_feats=8)
    assert encoded.shape == (2, 3, 32)
    # The first channel is sin of the sigmoid of cx scaled to [0, 2 pi].
    torch.testing.assert_close(encoded[..., 0], (proposals[..., 0].sigmoid() *
                                                 2 * math.pi).sin())


def test_encoder_reference_points_are_pixel_centres():
    spatial_shapes = torch.tensor([[2, 4]])
    valid_ratios = torch.tensor([[[1.0, 1.0]], [[0.5, 1.0]]])
    points = DeformableDetrEncoder.reference_points(spatial_shapes,
                                                    valid_ratios)
    assert points.shape == (2, 8, 1, 2)
    # Unpadded: centres of a 2x4 grid, row-major.
    torch.testing.assert_close(points[0, 1, 0], torch.tensor([0.375, 0.25]))
    # Half the width padded: x is normalised by the valid width, then
    # scaled back by the level's valid ratio, so it is unchanged here.
    torch.testing.assert_close(points[1, 1, 0], torch.tensor([0.375, 0.25]))


def test_flatten_levels_layout():
    model = transformer()
    features, masks = features_and_masks(padded=True)
    inputs = model.flatten_levels(features, masks)
    assert inputs.features.shape == (2, 100, EMBED_DIMS)
    assert inputs.positions.shape == (2, 100, EMBED_DIMS)
    assert inputs.padding_mask.shape == (2, 100)
    assert inputs.spatial_shapes.tolist() == [[8, 10], [4, 5]]
    assert inputs.level_start_index.tolist() == [0, 80]
    assert inputs.valid_sizes[1].tolist() == [[7, 6], [4, 3]]
    torch.testing.assert_close(inputs.valid_ratios[1],
                               torch.tensor([[0.7, 0.75], [0.8, 0.75]]))
    # Row-major flattening: position (row 1, column 2) of level 1.
    torch.testing.assert_close(inputs.features[:, 80 + 1 * 5 + 2],
                               features[1][:, :, 1, 2])
    unpadded = model.flatten_levels(features, None)
    assert unpadded.padding_mask is None
    assert torch.all(unpadded.valid_ratios == 1)


@pytest.mark.parametrize('as_two_stage', [False, True])
@pytest.mark.parametrize('refine', [False, True])
def test_stages_shapes_and_padding_invariance(as_two_stage, refine):
    torch.manual_seed(0)
    model = transformer(as_two_stage=as_two_stage).eval()
    reg_branches = torch.nn.ModuleList(
        [torch.nn.Linear(EMBED_DIMS, 4) for _ in range(3)])
    cls_branch = torch.nn.Linear(EMBED_DIMS, 5)
    features, masks = features_and_masks(padded=True)

    def run(features, masks):
        inputs = model.flatten_levels(features, masks)
        memory = model.encode(inputs)
        branches = dict(
            proposal_cls_branch=cls_branch,
            proposal_reg_branch=reg_branches[2]) if as_two_stage else {}
        queries = model.initial_queries(memory, inputs, **branches)
        hidden, references = model.decode(queries, memory, inputs,
                                          reg_branches if refine else None)
        return memory, queries, hidden, references

    memory, queries, hidden, references = run(features, masks)
    reference_dims = 4 if as_two_stage else 2
    assert memory.shape == (2, 100, EMBED_DIMS)
    assert queries.reference_points.shape == (2, 6, reference_dims)
    assert hidden.shape == (2, 2, 6, EMBED_DIMS)
    assert len(references) == 3
    assert references[-1].shape[-1] == (4 if refine else reference_dims)
    if as_two_stage:
        assert queries.enc_outputs_class.shape == (2, 100, 5)
        assert queries.enc_outputs_coord.shape == (2, 100, 4)
    else:
        assert queries.enc_outputs_class is None
    # Whatever lies in the padding of image 1 must not change its results.
    noisy = [feature.clone() for feature in features]
    for feature, mask in zip(noisy, masks):
        feature[1][:, mask[1]] = 100.0
    _, _, noisy_hidden, _ = run(noisy, masks)
    torch.testing.assert_close(noisy_hidden[:, 1], hidden[:, 1])


def test_refined_references_are_detached():
    decoder = transformer().decoder
    refined = decoder._refine(
        torch.randn(2, 3, 4, requires_grad=True), torch.rand(2, 3, 2))
    assert not refined.requires_grad
    assert refined.shape == (2, 3, 4)


def test_inverse_sigmoid_is_finite_at_the_bounds():
    values = inverse_sigmoid(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(values).all()
    assert values[1] == 0


def test_levels_must_agree():
    with pytest.raises(ValueError, match='num_feature_levels'):
        transformer(num_levels=2, decoder_levels=3)
    model = transformer()
    features, _ = features_and_masks(padded=False)
    with pytest.raises(ValueError, match='num_outs'):
        model.flatten_levels(features[:1], None)


def test_two_stage_needs_enough_positions():
    model = transformer(as_two_stage=True, num_queries=150)
    features, _ = features_and_masks(padded=False)
    inputs = model.flatten_levels(features, None)
    with pytest.raises(ValueError, match='lower num_queries'):
        model.initial_queries(
            model.encode(inputs), inputs, torch.nn.Linear(EMBED_DIMS, 5),
            torch.nn.Linear(EMBED_DIMS, 4))


def test_decoder_refuses_post_norm():
    with pytest.raises(ValueError, match='post_norm_cfg=None'):
        DeformableDetrDecoder(num_layers=1, post_norm_cfg=dict(type='LN'))
