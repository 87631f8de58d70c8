"""The two-stage "too few positions" error counts what it says it counts."""
import pytest
import torch

from ddetr_plugin.models.layers import DeformableDetrTransformer

EMBED_DIMS = 16


def two_stage_transformer(num_queries: int) -> DeformableDetrTransformer:
    attention = dict(
        embed_dims=EMBED_DIMS,
        num_heads=2,
        num_levels=2,
        num_points=1,
        dropout=0.0)
    ffn = dict(embed_dims=EMBED_DIMS, feedforward_channels=32)
    return DeformableDetrTransformer(
        encoder=dict(
            num_layers=1, layer_cfg=dict(self_attn_cfg=attention,
                                         ffn_cfg=ffn)),
        decoder=dict(
            num_layers=1,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=EMBED_DIMS, num_heads=2),
                cross_attn_cfg=attention,
                ffn_cfg=ffn)),
        positional_encoding=dict(num_feats=EMBED_DIMS // 2, normalize=True),
        num_feature_levels=2,
        num_queries=num_queries,
        as_two_stage=True)


def initial_queries(model):
    # Levels of 6 x 7 and 3 x 4: 42 + 12 = 54 positions in all.
    features = [
        torch.randn(1, EMBED_DIMS, 6, 7),
        torch.randn(1, EMBED_DIMS, 3, 4)
    ]
    inputs = model.flatten_levels(features, None)
    return model.initial_queries(
        model.encode(inputs), inputs, torch.nn.Linear(EMBED_DIMS, 3),
        torch.nn.Linear(EMBED_DIMS, 4))


def test_too_few_positions_counts_every_level_as_plain_numbers():
    with pytest.raises(ValueError) as error:
        initial_queries(two_stage_transformer(num_queries=55))
    message = str(error.value)
    assert 'num_queries=55' in message
    assert ('only 54 positions over its 2 feature levels (height x width: '
            '6x7, 3x4)') in message
    assert 'tensor' not in message
    assert 'model.num_queries' in message


def test_exactly_enough_positions_is_accepted():
    queries = initial_queries(two_stage_transformer(num_queries=54))
    assert queries.query.shape == (1, 54, EMBED_DIMS)
