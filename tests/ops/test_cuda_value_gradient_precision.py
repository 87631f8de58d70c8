"""Half-precision value gradients of the CUDA kernels at full size.

The backward scatters every sample into ``grad_value``; at the R50 encoder
size (22223 queries over 22223 keys, 8 heads of 32 channels, 4 levels of 4
points) a key of the coarsest level (13 x 21) receives about a thousand
contributions per channel. Summed by float16/bfloat16 atomics, each one
rounded, bfloat16 gradients were off by 2.2e-2 of their magnitude (level
3: 3.6e-2); the kernels now sum in float32 and round once. This runs the
kernel source in the CPU emulation (``cuda_emulation/``) at that size and
compares with the float64 reference on the same rounded inputs.

Slow by design: the whole backward grid, 89 thousand warps, runs lane by
lane (about 22 s per dtype on one busy core, plus 13 s for the float64
reference, computed once for both dtypes).
"""
import pytest
import torch

from ddetr_plugin.ops import ms_deform_attn_reference

R50_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))
NUM_HEADS, HEAD_DIMS, NUM_POINTS = 8, 32, 4

# Largest error of grad_value per level, relative to the level's largest
# reference magnitude: one rounding to the dtype is 2^-11 (fp16) and 2^-8
# (bf16) of an element at most, the limits the issue asked for.
VALUE_LIMITS = {torch.float16: 1e-3, torch.bfloat16: 5e-3}
# The weight gradients are float32 sums in both cases. (The location
# gradients are not compared here: among 2.8 million samples some lie
# within float32 rounding of a pixel edge, where the slope jumps; the other
# tests compare them away from such edges.)
WEIGHTS_LIMIT = 1e-3


def representable_in_both(tensor):
    """Round to bfloat16 and flush what float16 cannot hold exactly.

    A bfloat16 number (8 significant bits) is a float16 number unless its
    magnitude is below float16's normal range (2^-14), so both dtypes see
    the very same inputs and share one float64 reference.
    """
    rounded = tensor.to(torch.bfloat16).double()
    return torch.where(rounded.abs() < 2**-14, 0.0, rounded)


@pytest.fixture(scope='module', name='encoder_case')
def encoder_case_fixture():
    """Inputs of the R50 encoder at 800x1333 and the float64 gradients.

    Returns:
        tuple: (inputs, grad_output, expected): the op's five inputs, value
        (1, 22223, 8, 32) in float64, locations (1, 22223, 8, 4, 4, 2) and
        weights (1, 22223, 8, 4, 4) in float32 (as the kernels take them
        with a half value); grad_output (1, 22223, 256) in float64;
        expected, the reference's gradients of value and of weights.
    """
    spatial_shapes = torch.tensor(R50_LEVELS)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = sizes.cumsum(0) - sizes
    num_keys = int(sizes.sum())
    generator = torch.Generator().manual_seed(0)
    sample_shape = (1, num_keys, NUM_HEADS, len(R50_LEVELS), NUM_POINTS)
    value = representable_in_both(
        torch.randn(1, num_keys, NUM_HEADS, HEAD_DIMS, generator=generator))
    locations = torch.rand(*sample_shape, 2, generator=generator)
    weights = torch.rand(*sample_shape, generator=generator)
    grad_output = representable_in_both(
        torch.randn(1, num_keys, NUM_HEADS * HEAD_DIMS, generator=generator))
    # No location gradient: grid_sample's backward then skips it, which
    # halves the reference's time.
    value_leaf = value.clone().requires_grad_()
    weights_leaf = weights.double().requires_grad_()
    output = ms_deform_attn_reference(value_leaf,
                                      spatial_shapes, level_start_index,
                                      locations.double(), weights_leaf)
    output.backward(grad_output)
    inputs = [value, spatial_shapes, level_start_index, locations, weights]
    return inputs, grad_output, [value_leaf.grad, weights_leaf.grad]


def relative_error(actual, expected):
    """max |actual - expected| / max |expected|."""
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected).abs().max() / scale).item()


@pytest.mark.slow
@pytest.mark.parametrize(
    'dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
def test_r50_encoder_value_gradient_within_one_rounding(
        emulator, encoder_case, dtype):
    inputs, grad_output, expected = encoder_case
    value, spatial_shapes, level_start_index, locations, weights = inputs
    grad_value, _, grad_weights, width, group_size = emulator.backward(
        grad_output.to(dtype), value.to(dtype), spatial_shapes,
        level_start_index, locations, weights)
    # The launcher's configuration for 32 half channels: pairs of channels,
    # 16 lanes per query head.
    assert (width, group_size) == (2, 16)
    assert grad_value.dtype == dtype
    starts = level_start_index.tolist() + [value.shape[1]]
    errors = [
        relative_error(grad_value[:, start:end], expected[0][:, start:end])
        for start, end in zip(starts[:-1], starts[1:])
    ]
    assert max(errors) < VALUE_LIMITS[dtype], (
        f'grad_value error per level {errors}, limit {VALUE_LIMITS[dtype]}')
    assert relative_error(grad_weights, expected[1]) < WEIGHTS_LIMIT
