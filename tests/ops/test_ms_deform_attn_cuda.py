"""The CUDA kernels of ``ms_deform_attn`` against the float64 reference.

Every comparison runs ``ms_deform_attn_reference`` in float64 on the CPU on
the very inputs the kernel saw (rounded to the dtype under test), so the
tolerances measure the kernels' own arithmetic: float32 accumulation for
half inputs and, in the backward, half-precision atomics into grad_value.

The kernel tests run twice, through the ``kernels`` fixture:

- ``cuda``: the compiled op on a GPU. Skips, with the reason, when there is
  no CUDA device or when ``ddetr_plugin._C`` has no CUDA kernel (a CPU-only
  build). Nothing touches CUDA at import time: the check runs in a fixture.
- ``emulated``: the same kernel source compiled by the host compiler and
  run on the CPU, warp by warp, with the launcher's configuration
  (``cuda_emulation/``). It runs everywhere, CI included, and checks the
  kernels' indexing, channel packing, lane groups and shuffle reductions,
  grid-stride loops and half-precision rounding; it cannot show races,
  memory ordering or speed, which need the ``cuda`` runs.

Tests of the op's C++ glue, autograd, dispatch and devices need a GPU
(``cuda_kernel`` fixture).
"""
import importlib
import warnings

import pytest
import torch

from ddetr_plugin.ops import ms_deform_attn, ms_deform_attn_reference
from ddetr_plugin.ops.extension import kernel_device_types

FORWARD_OPERATOR = 'ddetr_plugin::ms_deform_attn_forward'
BACKWARD_OPERATOR = 'ddetr_plugin::ms_deform_attn_backward'
HALF_TYPES = (torch.float16, torch.bfloat16)
DTYPES = [
    pytest.param(torch.float64, id='fp64'),
    pytest.param(torch.float32, id='fp32'),
    pytest.param(torch.float16, id='fp16'),
    pytest.param(torch.bfloat16, id='bf16'),
]

# Largest error allowed, relative to max(1, largest reference magnitude),
# for the output, grad_value, and the gradients of locations and weights.
# Measured on the CPU emulation of the kernels: fp16 and bf16 outputs and
# grad_value (accumulated in float32) lose one rounding (2^-11, 2^-8); the
# location and weight gradients are float32 sums for every half type.
TOLERANCES = {
    torch.float64: dict(output=1e-10, value=1e-10, sampling=1e-10),
    torch.float32: dict(output=1e-4, value=1e-4, sampling=1e-4),
    torch.float16: dict(output=2e-3, value=1e-3, sampling=1e-3),
    torch.bfloat16: dict(output=1.6e-2, value=8e-3, sampling=1e-3),
}

# (batch_size, num_heads, head_dims, level_shapes, num_queries, num_points):
# head_dims picks the kernels' channel packing (1, 2, 4 or 8 channels per
# thread; 1 or 2 per lane and 1, 2, 4 ... 32 lanes per query head in the
# backward; more channels than lanes for 71, 128 and 1025).
CASES = [
    pytest.param(3, 4, 1, ((5, 7), (3, 2)), 9, 3, id='head_dims1-batch3'),
    pytest.param(
        1, 2, 30, ((6, 4), (3, 3), (1, 2)), 11, 2, id='head_dims30-batch1'),
    pytest.param(
        2,
        8,
        32, ((8, 8), (4, 4), (2, 2), (1, 1)),
        13,
        4,
        id='head_dims32-batch2'),
    pytest.param(5, 3, 71, ((4, 5), (2, 3)), 6, 2, id='head_dims71-batch5'),
    pytest.param(4, 2, 128, ((4, 4), (2, 3)), 5, 2, id='head_dims128-batch4'),
    pytest.param(1, 1, 1025, ((3, 4), ), 4, 2, id='head_dims1025-batch1'),
    pytest.param(2, 3, 6, ((4, 4), ), 7, 3, id='head_dims6-batch2'),
]


class EmulatedKernels:
    """The kernel source run on the CPU (see cuda_emulation/)."""
    device = 'cpu'

    def __init__(self, emulator):
        self.emulator = emulator
        # Launch configurations seen, for the tests that check coverage.
        self.forward_widths = []
        self.backward_configs = []

    def run(self, inputs, grad_output, max_blocks=0, reverse=False):
        options = dict(max_blocks=max_blocks, reverse=reverse)
        output, width = self.emulator.forward(*inputs, **options)
        grad_value, grad_locations, grad_weights, backward_width, group_size \
            = self.emulator.backward(grad_output, *inputs, **options)
        self.forward_widths.append(width)
        self.backward_configs.append((backward_width, group_size))
        return output, grad_value, grad_locations, grad_weights


@pytest.fixture(
    name='kernels',
    params=[pytest.param('cuda', marks=pytest.mark.cuda), 'emulated'])
def kernels_fixture(request):
    if request.param == 'cuda':
        return request.getfixturevalue('cuda_kernel')
    return EmulatedKernels(request.getfixturevalue('emulator'))


def location_dtype(dtype):
    """dtype of the locations and weights the kernels take with a value."""
    return torch.float32 if dtype in HALF_TYPES else dtype


def to_device(inputs, dtype, device='cuda'):
    """The float64 CPU inputs as the kernels take them, on ``device``.

    Returns:
        list[Tensor]: value in ``dtype``, the int64 level tensors, and the
        locations and weights in ``location_dtype(dtype)``.
    """
    value, spatial_shapes, level_start_index, locations, weights = inputs
    coordinate_dtype = location_dtype(dtype)
    return [
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, coordinate_dtype),
        weights.to(device, coordinate_dtype),
    ]


def reference_results(inputs, grad_output):
    """Float64 CPU reference of the output and the three gradients.

    Args:
        inputs (list[Tensor]): the op's five inputs, on any device and dtype.
        grad_output (Tensor): (bs, num_queries, num_heads * head_dims).

    Returns:
        tuple[Tensor]: output, grad of value, of sampling_locations and of
        attention_weights, float64 on the CPU.
    """
    value, spatial_shapes, level_start_index, locations, weights = [
        tensor.detach().cpu() for tensor in inputs
    ]
    leaves = [
        tensor.double().requires_grad_()
        for tensor in (value, locations, weights)
    ]
    output = ms_deform_attn_reference(leaves[0], spatial_shapes,
                                      level_start_index, leaves[1], leaves[2])
    output.backward(grad_output.detach().cpu().double())
    return (output.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad)


def assert_matches(actual, expected, tolerance, name):
    """Max error of ``actual`` within ``tolerance * max(1, |expected|)``."""
    assert actual.shape == expected.shape, (
        f'{name}: expected shape {tuple(expected.shape)}, got '
        f'{tuple(actual.shape)}')
    scale = 1.0
    if expected.numel():
        scale = max(scale, expected.abs().max().item())
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected,
        atol=tolerance * scale,
        rtol=0.0,
        msg=lambda message: f'{name}: {message}')


def assert_all_match(results, expected, dtype):
    tolerance = TOLERANCES[dtype]
    names = ('output', 'grad_value', 'grad_sampling_locations',
             'grad_attention_weights')
    tolerances = (tolerance['output'], tolerance['value'],
                  tolerance['sampling'], tolerance['sampling'])
    for result, want, name, limit in zip(results, expected, names, tolerances):
        assert_matches(result, want, limit, f'{name} ({dtype})')


def front_results(inputs, grad_output):
    """Output and gradients through ``ms_deform_attn`` and autograd."""
    leaves = [
        tensor.detach().clone().requires_grad_(tensor.is_floating_point())
        for tensor in inputs
    ]
    output = ms_deform_attn(*leaves)
    output.backward(grad_output)
    torch.cuda.synchronize()
    return (output, leaves[0].grad, leaves[3].grad, leaves[4].grad)


def random_grad_output(inputs, dtype, seed=1):
    value, _, _, locations, _ = inputs
    generator = torch.Generator().manual_seed(seed)
    shape = (value.shape[0], locations.shape[1],
             value.shape[2] * value.shape[3])
    return torch.randn(
        shape, generator=generator,
        dtype=torch.float64).to(value.device, dtype)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize(('batch_size', 'num_heads', 'head_dims',
                          'level_shapes', 'num_queries', 'num_points'), CASES)
def test_kernels_match_reference(kernels, random_inputs, dtype, batch_size,
                                 num_heads, head_dims, level_shapes,
                                 num_queries, num_points):
    inputs = to_device(
        random_inputs(
            batch_size=batch_size,
            level_shapes=level_shapes,
            num_queries=num_queries,
            num_heads=num_heads,
            head_dims=head_dims,
            num_points=num_points,
            low=-0.15,
            high=1.15,
            seed=head_dims), dtype, kernels.device)
    grad_output = random_grad_output(inputs, dtype)
    results = kernels.run(inputs, grad_output)
    output, grad_value, grad_locations, grad_weights = results
    assert output.dtype == dtype
    assert output.device.type == kernels.device
    assert grad_value.dtype == dtype
    assert grad_locations.dtype == location_dtype(dtype)
    assert grad_weights.dtype == location_dtype(dtype)
    assert_all_match(results, reference_results(inputs, grad_output), dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_front_matches_reference_on_cuda(cuda_kernel, random_inputs, dtype,
                                         monkeypatch):
    front = importlib.import_module('ddetr_plugin.ops.ms_deform_attn')

    def fallback_used(*args, **kwargs):
        raise AssertionError('the plain-PyTorch fallback served a CUDA call')

    # Any path through the reference would now fail the test.
    monkeypatch.setattr(front, '_reference_in_compute_dtype', fallback_used)
    monkeypatch.setattr(front, 'ms_deform_attn_reference', fallback_used)
    assert 'cuda' in kernel_device_types()
    inputs = to_device(
        random_inputs(
            batch_size=2,
            level_shapes=((6, 8), (3, 4), (2, 2)),
            num_queries=10,
            num_heads=4,
            head_dims=32,
            num_points=3,
            seed=7), dtype)
    grad_output = random_grad_output(inputs, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        results = front_results(inputs, grad_output)
    # The fallback also announces itself with a warning.
    fallback_warnings = [
        str(warning.message) for warning in caught
        if 'reference' in str(warning.message)
    ]
    assert not fallback_warnings
    assert results[0].dtype == dtype
    assert_all_match(results, reference_results(inputs, grad_output), dtype)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_borders_and_outside_match_reference(kernels, random_inputs,
                                             border_locations, dtype):
    # Power-of-two sizes make every special location exact in binary, so
    # samples on pixel -1 and on the borders land exactly there for both
    # the kernel and the reference, whose slopes must then agree too.
    level_shapes = ((4, 8), (2, 2), (1, 4))
    inputs = random_inputs(
        batch_size=2,
        level_shapes=level_shapes,
        num_queries=10,
        num_heads=2,
        head_dims=5,
        num_points=10)
    inputs[3] = border_locations(level_shapes, batch_size=2, num_heads=2)
    inputs = to_device(inputs, dtype, kernels.device)
    grad_output = random_grad_output(inputs, dtype)
    results = kernels.run(inputs, grad_output)
    assert_all_match(results, reference_results(inputs, grad_output), dtype)


@pytest.mark.parametrize('dtype', DTYPES)
def test_non_finite_locations_read_zeros(kernels, random_inputs, dtype):
    inputs = random_inputs(
        batch_size=2,
        level_shapes=((3, 5), (2, 2)),
        num_queries=6,
        num_heads=2,
        head_dims=4,
        num_points=2)
    locations = inputs[3]
    bad_samples = [(0, 0, 0, 0, 0, 0), (0, 1, 1, 1, 1, 1), (1, 2, 0, 0, 1, 0),
                   (1, 3, 1, 1, 0, 1), (0, 4, 0, 1, 0, 0), (1, 5, 1, 0, 0, 1)]
    bad_values = [
        float('nan'),
        float('nan'),
        float('inf'),
        float('-inf'), 1e30, -1e30
    ]
    for index, bad in zip(bad_samples, bad_values):
        locations[index] = bad
    inputs = to_device(inputs, dtype, kernels.device)
    grad_output = random_grad_output(inputs, dtype)
    results = kernels.run(inputs, grad_output)
    for result in results:
        assert torch.isfinite(result).all()
    grad_locations = results[2]
    for index in bad_samples:
        # A sample outside the map has no slope in x nor in y.
        assert grad_locations[index[:5]].abs().max().item() == 0.0
    assert_all_match(results, reference_results(inputs, grad_output), dtype)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_unaligned_value_matches_reference(kernels, random_inputs, dtype):
    # A contiguous value starting one element into its storage cannot be
    # read in packs; the launcher must notice and read channel by channel.
    inputs = to_device(
        random_inputs(
            batch_size=2,
            level_shapes=((4, 4), (2, 2)),
            num_queries=5,
            num_heads=2,
            head_dims=32,
            num_points=2), dtype, kernels.device)
    value = inputs[0]
    storage = torch.empty(
        value.numel() + 1, dtype=dtype, device=kernels.device)
    shifted = storage[1:].view(value.shape)
    shifted.copy_(value)
    assert shifted.is_contiguous() and shifted.storage_offset() == 1
    inputs[0] = shifted
    grad_output = random_grad_output(inputs, dtype)
    shifted_grad = torch.empty(
        grad_output.numel() + 1, dtype=dtype, device=kernels.device)[1:]
    shifted_grad = shifted_grad.view(grad_output.shape).copy_(grad_output)
    results = kernels.run(inputs, shifted_grad)
    assert_all_match(results, reference_results(inputs, grad_output), dtype)
    if isinstance(kernels, EmulatedKernels):
        # head_dims 32 would otherwise take packs of 4 or 8 and pairs.
        assert kernels.forward_widths == [1]
        assert kernels.backward_configs == [(1, 32)]


@pytest.mark.parametrize(('batch_size', 'num_queries', 'num_points'),
                         [(2, 0, 2), (0, 3, 2), (2, 3, 0)],
                         ids=['no-queries', 'no-batch', 'no-points'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
def test_empty_inputs(cuda_kernel, random_inputs, dtype, batch_size,
                      num_queries, num_points):
    inputs = to_device(
        random_inputs(
            batch_size=batch_size,
            num_queries=num_queries,
            num_points=num_points,
            num_heads=2,
            head_dims=4), dtype)
    grad_output = random_grad_output(inputs, dtype)
    output, grad_value, grad_locations, grad_weights = cuda_kernel.run(
        inputs, grad_output)
    assert output.shape == (batch_size, num_queries, 8)
    # No sample: the output is a sum over nothing.
    assert (output == 0).all()
    assert grad_value.shape == inputs[0].shape
    assert (grad_value == 0).all()
    assert grad_locations.shape == inputs[3].shape
    assert grad_weights.shape == inputs[4].shape


def test_gradcheck_float64(cuda_kernel, random_inputs, off_kink_locations):
    inputs = random_inputs(
        batch_size=2,
        level_shapes=((3, 4), (2, 2)),
        num_queries=3,
        num_heads=2,
        head_dims=3,
        num_points=2)
    inputs[3] = off_kink_locations(inputs[1], inputs[4].shape)
    inputs = [
        tensor.cuda().requires_grad_(tensor.is_floating_point())
        for tensor in to_device(inputs, torch.float64)
    ]
    # Atomic adds in a different order change grad_value in its last bits.
    assert torch.autograd.gradcheck(
        ms_deform_attn, tuple(inputs), eps=1e-6, atol=1e-5, nondet_tol=1e-12)


# Repeated runs may add grad_value's atomics in another order, hence
# tolerances of a few units in the last place of the dtype.
@pytest.mark.parametrize(('dtype', 'tolerance'), [(torch.float32, 1e-5),
                                                  (torch.bfloat16, 3e-2)])
def test_opcheck_on_cuda(cuda_kernel, random_inputs, dtype, tolerance):
    inputs = to_device(random_inputs(), dtype)
    forward_inputs = tuple(
        tensor.requires_grad_(tensor.is_floating_point()) for tensor in inputs)
    torch.library.opcheck(
        torch.ops.ddetr_plugin.ms_deform_attn_forward,
        forward_inputs,
        rtol=tolerance,
        atol=tolerance)
    grad_output = random_grad_output(inputs, dtype)
    torch.library.opcheck(
        torch.ops.ddetr_plugin.ms_deform_attn_backward,
        (grad_output, *[t.detach() for t in inputs]),
        rtol=tolerance,
        atol=tolerance)


def test_mismatched_dtypes_name_the_problem(cuda_kernel, random_inputs):
    inputs = to_device(random_inputs(), torch.float16)
    inputs[3] = inputs[3].half()
    inputs[4] = inputs[4].half()
    with pytest.raises(
            RuntimeError,
            match='expected sampling_locations and '
            'attention_weights of dtype Float'):
        torch.ops.ddetr_plugin.ms_deform_attn_forward(*inputs)


def test_mismatched_shapes_name_the_problem(cuda_kernel, random_inputs):
    inputs = to_device(random_inputs(), torch.float32)
    inputs[4] = inputs[4][:, :, :, :, :1].contiguous()
    with pytest.raises(
            RuntimeError, match='expected attention_weights of '
            'shape'):
        torch.ops.ddetr_plugin.ms_deform_attn_forward(*inputs)


def test_runs_on_the_inputs_device(cuda_kernel, random_inputs):
    if torch.cuda.device_count() < 2:
        pytest.skip('needs two CUDA devices')
    inputs = [
        tensor.to('cuda:1')
        for tensor in to_device(random_inputs(), torch.float32)
    ]
    grad_output = random_grad_output(inputs, torch.float32).to('cuda:1')
    with torch.cuda.device(0):
        results = cuda_kernel.run(inputs, grad_output)
    assert all(result.device == torch.device('cuda:1') for result in results)
    assert_all_match(results, reference_results(inputs, grad_output),
                     torch.float32)


def test_offsets_beyond_int32(cuda_kernel, level_tensors):
    # value has more than 2**31 elements and the sampled rows lie past that
    # index: 32-bit offsets would read the wrong rows (or fault).
    height, width, head_dims = 8200, 8192, 32
    value_bytes = height * width * head_dims * 2
    # Held at once: the fp16 value, the backward's float32 accumulation
    # buffer of grad_value (twice the value's bytes) and grad_value rounded
    # to fp16: 4 times the value's 4.3 GB, 17.2 GB.
    needed_bytes = 4 * value_bytes
    total_memory = torch.cuda.get_device_properties(0).total_memory
    if needed_bytes > total_memory:
        pytest.skip(f'needs {needed_bytes / 2**30:.0f} GiB of GPU memory, '
                    f'the GPU has {total_memory / 2**30:.0f} GiB')
    spatial_shapes, level_start_index, num_keys = level_tensors([(height,
                                                                  width)])
    assert num_keys * head_dims > 2**31
    value = torch.zeros(
        1, num_keys, 1, head_dims, dtype=torch.float16, device='cuda')
    # The last two rows hold the same channels, so any sample between them
    # reads exactly those channels, whatever its bilinear weights.
    channels = torch.arange(1, head_dims + 1, device='cuda') / 8
    value[0, (height - 2) * width:, 0] = channels.half()
    # Half way between the two last rows, in the middle of the width.
    location = torch.tensor([0.5, (height - 1) / height], device='cuda')
    locations = location.view(1, 1, 1, 1, 1, 2)
    weights = torch.ones(1, 1, 1, 1, 1, device='cuda')
    inputs = [
        value,
        spatial_shapes.cuda(),
        level_start_index.cuda(), locations, weights
    ]
    grad_output = torch.ones(
        1, 1, head_dims, dtype=torch.float16, device='cuda')
    output, grad_value, grad_locations, grad_weights = cuda_kernel.run(
        inputs, grad_output)
    torch.testing.assert_close(
        output.view(-1).float(), channels.float(), atol=1e-3, rtol=0)
    # The four corners are past 2**31 elements; their weights sum to one.
    corner_rows = grad_value[0, (height - 2) * width:, 0].float()
    torch.testing.assert_close(
        corner_rows.sum(0), torch.ones_like(channels), atol=2e-3, rtol=0)
    # Nothing else was written (summed without a float32 copy of 4 GiB).
    assert grad_value.sum(dtype=torch.float32).item() == pytest.approx(
        head_dims, abs=0.1)
    # Both rows and both columns hold the same channels: no slope, up to
    # float32 rounding magnified by the map size (8192). Reading wrong rows
    # (zeros) would give slopes of the order of the channels times 8192.
    assert grad_locations.abs().max().item() < 1.0
    torch.testing.assert_close(
        grad_weights.view(()).float(),
        channels.sum().float(),
        atol=1e-3,
        rtol=1e-4)


def emulated_case(random_inputs, dtype, head_dims, batch_size, num_queries,
                  seed):
    """Inputs and output gradient of a small case, on the CPU, as the
    kernels take them: 3 heads, 2 levels of 2 points."""
    inputs = to_device(
        random_inputs(
            batch_size=batch_size,
            level_shapes=((4, 3), (2, 2)),
            num_queries=num_queries,
            num_heads=3,
            head_dims=head_dims,
            num_points=2,
            seed=seed), dtype, 'cpu')
    return inputs, random_grad_output(inputs, dtype)


# (dtype, head_dims) -> the launcher's choice of channels per forward
# thread, and of channels per backward lane and lanes per query head:
# 16-byte packs where head_dims allows, pairs in the backward, the smallest
# power-of-two group of lanes covering the packs, at most a warp.
LAUNCH_CONFIGURATIONS = [
    pytest.param(torch.float16, 32, 8, (2, 16), id='fp16-32'),
    pytest.param(torch.bfloat16, 128, 8, (2, 32), id='bf16-128'),
    pytest.param(torch.float32, 32, 4, (2, 16), id='fp32-32'),
    pytest.param(torch.float64, 32, 2, (2, 16), id='fp64-32'),
    pytest.param(torch.float16, 12, 4, (2, 8), id='fp16-12'),
    pytest.param(torch.float32, 6, 2, (2, 4), id='fp32-6'),
    pytest.param(torch.float32, 71, 1, (1, 32), id='fp32-71'),
    pytest.param(torch.float64, 1, 1, (1, 1), id='fp64-1'),
]


@pytest.mark.parametrize(
    ('dtype', 'head_dims', 'forward_width', 'backward_config'),
    LAUNCH_CONFIGURATIONS)
def test_emulated_launch_configurations(emulator, random_inputs, dtype,
                                        head_dims, forward_width,
                                        backward_config):
    kernels = EmulatedKernels(emulator)
    inputs, grad_output = emulated_case(
        random_inputs,
        dtype,
        head_dims,
        batch_size=2,
        num_queries=3,
        seed=head_dims)
    results = kernels.run(inputs, grad_output)
    assert kernels.forward_widths == [forward_width]
    assert kernels.backward_configs == [backward_config]
    assert_all_match(results, reference_results(inputs, grad_output), dtype)


@pytest.mark.parametrize(('dtype', 'head_dims'), [(torch.float32, 32),
                                                  (torch.float16, 6),
                                                  (torch.float64, 71)])
def test_emulated_grid_stride_loops(emulator, random_inputs, dtype, head_dims):
    # One block of 256 threads for 540 (head_dims 6: 135 query heads of 4
    # lanes) to 4320 threads: every thread loops, and with head_dims 6 the
    # last pass has a partly active warp.
    kernels = EmulatedKernels(emulator)
    inputs, grad_output = emulated_case(
        random_inputs, dtype, head_dims, batch_size=5, num_queries=9, seed=3)
    results = kernels.run(inputs, grad_output, max_blocks=1)
    assert_all_match(results, reference_results(inputs, grad_output), dtype)


def test_emulation_reports_divergent_shuffles(emulator):
    # The emulation's own check: a warp whose lanes do not all reach a
    # full-mask shuffle (undefined on a GPU) is reported, not run.
    with pytest.raises(RuntimeError, match='divergent full-mask shuffle'):
        emulator.divergent_shuffle_probe()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('head_dims', [6, 71])
def test_emulated_results_do_not_depend_on_thread_order(
        emulator, random_inputs, dtype, head_dims):
    # Every output element, location and weight gradient has exactly one
    # writer, so running blocks, warps and lanes in the opposite order must
    # give the same bits; two threads writing the same element would not.
    # grad_value is summed by atomics, whose order changes its rounding.
    kernels = EmulatedKernels(emulator)
    inputs, grad_output = emulated_case(
        random_inputs, dtype, head_dims, batch_size=3, num_queries=9, seed=5)
    forward_order = kernels.run(inputs, grad_output, max_blocks=2)
    reverse_order = kernels.run(
        inputs, grad_output, max_blocks=2, reverse=True)
    for index in (0, 2, 3):
        assert torch.equal(forward_order[index], reverse_order[index])
    assert_all_match(forward_order, reference_results(inputs, grad_output),
                     dtype)
    assert_all_match(reverse_order, reference_results(inputs, grad_output),
                     dtype)


def test_emulated_r50_decoder_shape(emulator, level_tensors):
    # The real sizes of the R50 decoder at 800x1333 (22223 keys over maps
    # up to 167 wide, 300 queries, 8 heads of 32 channels, 4 levels of 4
    # points): offsets, packing and coordinates at full scale. Location
    # gradients reach thousands (they scale with the map size), hence the
    # relative tolerance.
    spatial_shapes, level_start_index, num_keys = level_tensors([(100, 167),
                                                                 (50, 84),
                                                                 (25, 42),
                                                                 (13, 21)])
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, num_keys, 8, 32, generator=generator)
    locations = torch.rand(1, 300, 8, 4, 4, 2, generator=generator)
    weights = torch.rand(1, 300, 8, 4, 4, generator=generator)
    inputs = [value, spatial_shapes, level_start_index, locations, weights]
    grad_output = torch.randn(1, 300, 256, generator=generator)
    kernels = EmulatedKernels(emulator)
    results = kernels.run(inputs, grad_output)
    assert kernels.forward_widths == [4]
    assert kernels.backward_configs == [(2, 16)]
    assert_all_match(results, reference_results(inputs, grad_output),
                     torch.float32)
