"""MultiScaleDeformableAttention: init, mmcv compatibility, masks, errors."""
import math

import pytest
import torch

from ddetr_plugin.models.layers import MultiScaleDeformableAttention

SPATIAL_SHAPES = torch.tensor([[6, 8], [3, 4]])
LEVEL_START_INDEX = torch.tensor([0, 48])
NUM_VALUES = 60


def make_attention(**kwargs) -> MultiScaleDeformableAttention:
    options = dict(
        embed_dims=32,
        num_heads=4,
        num_levels=2,
        num_points=3,
        dropout=0.0,
        batch_first=True)
    options.update(kwargs)
    return MultiScaleDeformableAttention(**options)


def perturb(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(
                torch.randn(parameter.shape, generator=generator) * 0.1)


def inputs(batch_size=2, num_queries=5, reference_dims=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch_size, num_queries, 32, generator=generator)
    value = torch.randn(batch_size, NUM_VALUES, 32, generator=generator)
    reference_points = torch.rand(
        batch_size, num_queries, 2, reference_dims, generator=generator)
    return query, value, reference_points


def test_init_points_each_head_in_its_own_direction():
    attention = make_attention(num_heads=8, num_points=4)
    offsets = attention.sampling_offsets.bias.view(8, 2, 4, 2)
    for head in range(8):
        angle = 2 * math.pi * head / 8
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for point in range(4):
            # The same on every level, radius growing with the point index.
            expected = direction * (point + 1)
            torch.testing.assert_close(offsets[head, 0, point], expected)
            torch.testing.assert_close(offsets[head, 1, point], expected)
    assert torch.all(attention.sampling_offsets.weight == 0)
    assert torch.all(attention.attention_weights.weight == 0)
    assert torch.all(attention.attention_weights.bias == 0)
    assert torch.all(attention.value_proj.bias == 0)
    assert attention.value_proj.weight.abs().sum() > 0


def test_parameter_names_match_mmcv():
    names = {name for name, _ in make_attention().named_parameters()}
    assert names == {
        f'{layer}.{kind}'
        for layer in ('sampling_offsets', 'attention_weights', 'value_proj',
                      'output_proj')
        for kind in ('weight', 'bias')
    }


@pytest.mark.parametrize('reference_dims', [2, 4])
@pytest.mark.parametrize('batch_first', [True, False])
@pytest.mark.parametrize('value_proj_ratio', [1.0, 0.5])
def test_matches_mmcv_with_mmcv_weights(reference_dims, batch_first,
                                        value_proj_ratio):
    mmcv_ops = pytest.importorskip('mmcv.ops')
    torch.manual_seed(0)
    theirs = mmcv_ops.MultiScaleDeformableAttention(
        embed_dims=32,
        num_heads=4,
        num_levels=2,
        num_points=3,
        dropout=0.0,
        batch_first=batch_first,
        value_proj_ratio=value_proj_ratio)
    perturb(theirs)
    ours = make_attention(
        batch_first=batch_first,
        value_proj_ratio=value_proj_ratio,
        im2col_step=128)
    # Weights trained with mmcv load unchanged.
    ours.load_state_dict(theirs.state_dict(), strict=True)
    query, value, reference_points = inputs(reference_dims=reference_dims)
    query_pos = torch.randn_like(query)
    padding = torch.zeros(2, NUM_VALUES, dtype=torch.bool)
    padding[1, 40:48] = True
    padding[1, 56:] = True
    if not batch_first:
        query, value, query_pos = (
            t.transpose(0, 1) for t in (query, value, query_pos))
    arguments = dict(
        query=query,
        value=value,
        query_pos=query_pos,
        key_padding_mask=padding,
        reference_points=reference_points,
        spatial_shapes=SPATIAL_SHAPES,
        level_start_index=LEVEL_START_INDEX)
    expected = theirs(**arguments)
    received = ours(**arguments)
    assert received.shape == query.shape
    torch.testing.assert_close(received, expected, rtol=1e-5, atol=1e-5)


def test_padded_values_do_not_matter():
    attention = make_attention()
    perturb(attention)
    query, value, reference_points = inputs()
    padding = torch.zeros(2, NUM_VALUES, dtype=torch.bool)
    padding[0, 30:48] = True
    changed = value.clone()
    changed[padding] = 1e3
    arguments = dict(
        key_padding_mask=padding,
        reference_points=reference_points,
        spatial_shapes=SPATIAL_SHAPES,
        level_start_index=LEVEL_START_INDEX)
    torch.testing.assert_close(
        attention(query, value=changed, **arguments),
        attention(query, value=value, **arguments))
    # Without the mask the same change shows.
    arguments['key_padding_mask'] = None
    assert not torch.allclose(
        attention(query, value=changed, **arguments),
        attention(query, value=value, **arguments))


def test_identity_shortcut_and_gradients():
    attention = make_attention()
    perturb(attention)
    query, value, reference_points = inputs()
    identity = torch.randn_like(query)
    arguments = dict(
        value=value,
        reference_points=reference_points,
        spatial_shapes=SPATIAL_SHAPES,
        level_start_index=LEVEL_START_INDEX)
    with_identity = attention(query, identity=identity, **arguments)
    without = attention(query, **arguments)
    torch.testing.assert_close(with_identity - identity, without - query)
    without.square().sum().backward()
    for name, parameter in attention.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, \
            name


def test_reference_boxes_scale_the_offsets():
    attention = make_attention()
    perturb(attention)
    query, value, _ = inputs(reference_dims=4)
    centres = torch.rand(2, 5, 2, 2)
    arguments = dict(
        value=value,
        spatial_shapes=SPATIAL_SHAPES,
        level_start_index=LEVEL_START_INDEX)
    tiny = torch.cat([centres, torch.full_like(centres, 1e-6)], -1)
    large = torch.cat([centres, torch.full_like(centres, 0.8)], -1)
    # A box of (almost) no size samples its centre only, which a point
    # reference with zero offsets would also do.
    with torch.no_grad():
        attention_at_centre = make_attention()
        attention_at_centre.load_state_dict(attention.state_dict())
        attention_at_centre.sampling_offsets.weight.zero_()
        attention_at_centre.sampling_offsets.bias.zero_()
    torch.testing.assert_close(
        attention(query, reference_points=tiny, **arguments),
        attention_at_centre(query, reference_points=centres, **arguments),
        rtol=1e-4,
        atol=1e-4)
    assert not torch.allclose(
        attention(query, reference_points=tiny, **arguments),
        attention(query, reference_points=large, **arguments))


def test_rejects_reference_points_of_wrong_last_dim():
    attention = make_attention()
    query, value, _ = inputs()
    with pytest.raises(ValueError, match='2 .*or 4'):
        attention(
            query,
            value=value,
            reference_points=torch.rand(2, 5, 2, 3),
            spatial_shapes=SPATIAL_SHAPES,
            level_start_index=LEVEL_START_INDEX)


def test_rejects_spatial_shapes_with_other_num_levels():
    attention = make_attention(num_levels=3)
    query, value, _ = inputs()
    with pytest.raises(ValueError, match='num_levels=3'):
        attention(
            query,
            value=value,
            reference_points=torch.rand(2, 5, 3, 2),
            spatial_shapes=SPATIAL_SHAPES,
            level_start_index=LEVEL_START_INDEX)


def test_rejects_value_that_does_not_cover_the_levels():
    attention = make_attention()
    query, value, reference_points = inputs()
    with pytest.raises(ValueError, match='60 positions but value has 59'):
        attention(
            query,
            value=value[:, :59],
            reference_points=reference_points,
            spatial_shapes=SPATIAL_SHAPES,
            level_start_index=LEVEL_START_INDEX)


def test_rejects_heads_that_do_not_divide_embed_dims():
    with pytest.raises(ValueError, match='divisible by num_heads'):
        MultiScaleDeformableAttention(embed_dims=30, num_heads=4)
