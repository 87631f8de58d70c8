"""Deterministic CUDA backward under torch.use_deterministic_algorithms.

The usual backward scatters into grad_value with atomic adds, whose order
(and so the float rounding) changes from run to run. The deterministic one
gathers each grad_value element in a fixed order
(``ms_deform_attn_deterministic.cuh``). The emulation takes the path the
launcher's own rule (``plan_value_grad``) picks from the deterministic
switch. There, blocks, warps and lanes run in shuffled orders and must give
the same bits; the same shuffles change the atomic path's bits, which shows
that the comparison can fail. On a GPU (skipped without one) runs under
``torch.use_deterministic_algorithms(True)`` must agree bitwise with each
other and with the emulation, which the atomic path does not.
"""
import pytest
import torch

from ddetr_plugin.ops import ms_deform_attn, ms_deform_attn_reference

# Launch variations: (max_blocks, reverse, shuffle_seed).
ORDERS = [(0, False, 0), (0, True, 0), (0, False, 1), (0, False, 2),
          (1, False, 3), (2, False, 4)]


def contended_case(random_inputs, dtype, head_dims, seed=0):
    """Many queries over small maps: every key receives many contributions,
    so the order of the additions matters to the last bit."""
    inputs = random_inputs(
        batch_size=2,
        level_shapes=((3, 3), (1, 2)),
        num_queries=40,
        num_heads=3,
        head_dims=head_dims,
        num_points=3,
        seed=seed)
    coordinate_dtype = torch.float64 if dtype == torch.float64 else (
        torch.float32)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    kernel_inputs = [
        value.to(dtype), spatial_shapes, level_start_index,
        locations.to(coordinate_dtype),
        weights.to(coordinate_dtype)
    ]
    generator = torch.Generator().manual_seed(seed + 1)
    grad_output = torch.randn(
        2, 40, 3 * head_dims, generator=generator).to(dtype)
    return kernel_inputs, grad_output


def reference_value_gradient(inputs, grad_output):
    value = inputs[0].double().requires_grad_()
    output = ms_deform_attn_reference(value, inputs[1], inputs[2],
                                      inputs[3].double(), inputs[4].double())
    output.backward(grad_output.double())
    return value.grad


@pytest.mark.parametrize(
    'dtype', [torch.float32, torch.bfloat16, torch.float64],
    ids=['fp32', 'bf16', 'fp64'])
@pytest.mark.parametrize('head_dims', [6, 71])
def test_emulated_deterministic_backward_is_bitwise_stable(
        emulator, random_inputs, dtype, head_dims):
    inputs, grad_output = contended_case(random_inputs, dtype, head_dims)
    runs = [
        emulator.backward(
            grad_output,
            *inputs,
            max_blocks=max_blocks,
            reverse=reverse,
            shuffle_seed=seed,
            deterministic=True) for max_blocks, reverse, seed in ORDERS
    ]
    first = runs[0]
    for run in runs[1:]:
        for have, want in zip(run[:3], first[:3]):
            assert torch.equal(have, want)
    # And it is the right gradient: one rounding to the dtype.
    expected = reference_value_gradient(inputs, grad_output)
    tolerance = {
        torch.float64: 1e-12,
        torch.float32: 1e-5,
        torch.bfloat16: 8e-3
    }[dtype]
    scale = expected.abs().max().item()
    assert (first[0].double() - expected).abs().max().item() <= (
        tolerance * scale)
    # The location and weight gradients match the atomic path's exactly:
    # the same kernel writes them.
    atomic = emulator.backward(grad_output, *inputs)
    assert torch.equal(first[1], atomic[1])
    assert torch.equal(first[2], atomic[2])


def test_emulated_atomic_backward_depends_on_order(emulator, random_inputs):
    # The control: the same shuffles change the bits of the atomic path,
    # so the test above would see an order dependence.
    inputs, grad_output = contended_case(random_inputs, torch.float32, 6)
    value_gradients = [
        emulator.backward(
            grad_output,
            *inputs,
            max_blocks=max_blocks,
            reverse=reverse,
            shuffle_seed=seed)[0] for max_blocks, reverse, seed in ORDERS
    ]
    assert not all(
        torch.equal(gradient, value_gradients[0])
        for gradient in value_gradients[1:])


@pytest.mark.parametrize('deterministic', [True, False])
def test_emulated_backward_takes_the_launchers_path(emulator, random_inputs,
                                                    deterministic):
    inputs, _ = contended_case(random_inputs, torch.float32, 6)
    plan = emulator.value_grad_plan(inputs[0], inputs[3], deterministic)
    assert plan['gather'] == deterministic
    if deterministic:
        # 2 x 11 x 3 = 66 value rows (and 66 for corners outside): the sort
        # orders by the 7 bits that hold 66, not by all 64.
        assert plan['num_rows'] == 66
        assert plan['sort_key_bits'] == 7


def test_emulated_deterministic_backward_with_no_keys(emulator, random_inputs):
    # Levels of 0 x 3 and 2 x 0 keys: every sample reads zeros, and
    # grad_value is empty, so the launcher must launch no gather (CUDA
    # refuses an empty grid, and so does the emulation).
    inputs = random_inputs(level_shapes=((0, 3), (2, 0)), dtype=torch.float32)
    assert inputs[0].shape[1] == 0
    grad_output = torch.randn(2, 3, 8)
    grad_value, grad_locations, grad_weights, _, _ = emulator.backward(
        grad_output, *inputs, deterministic=True)
    assert grad_value.shape == inputs[0].shape
    assert torch.equal(grad_locations, torch.zeros_like(grad_locations))
    assert torch.equal(grad_weights, torch.zeros_like(grad_weights))


def test_emulation_refuses_an_empty_launch(emulator):
    with pytest.raises(RuntimeError, match='grid of 0 blocks'):
        emulator.empty_launch_probe()


@pytest.fixture(name='deterministic_algorithms')
def deterministic_algorithms_fixture():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def cuda_gradients(inputs, grad_output):
    """Gradients of value, locations and weights from the CUDA op, for
    CPU ``inputs`` and ``grad_output``, returned on the GPU."""
    leaves = [
        tensor.detach().cuda().requires_grad_()
        if tensor.is_floating_point() else tensor.cuda() for tensor in inputs
    ]
    ms_deform_attn(*leaves).backward(grad_output.cuda())
    torch.cuda.synchronize()
    return [leaves[index].grad for index in (0, 3, 4)]


def test_cuda_deterministic_backward_with_no_keys(cuda_kernel, random_inputs,
                                                  deterministic_algorithms):
    # The launch CUDA would refuse ("invalid configuration argument") is
    # skipped: grad_value is empty, the other gradients zero.
    inputs = random_inputs(level_shapes=((0, 3), (2, 0)), dtype=torch.float32)
    grad_value, grad_locations, grad_weights = cuda_gradients(
        inputs, torch.randn(2, 3, 8))
    assert grad_value.shape == inputs[0].shape
    assert not grad_locations.any() and not grad_weights.any()


@pytest.mark.parametrize(
    'dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_cuda_gather_gives_the_cpu_runs_bits(cuda_kernel, request,
                                             random_inputs, dtype):
    # The gather's roundings are all explicit (products and fused
    # multiply-adds), so the kernels run on the CPU give the GPU's bits,
    # and only the deterministic path does: the control below shows that
    # the atomic path's value gradient differs from them.
    emulator = request.getfixturevalue('emulator')  # built only if needed
    inputs, grad_output = contended_case(random_inputs, dtype, 32)
    emulated = emulator.backward(grad_output, *inputs, deterministic=True)[0]
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        gathered = cuda_gradients(inputs, grad_output)[0].cpu()
        torch.use_deterministic_algorithms(False)
        scattered = cuda_gradients(inputs, grad_output)[0].cpu()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(gathered, emulated), (
        f'{(gathered != emulated).sum().item()} of {emulated.numel()} '
        'elements differ from the CPU run of the deterministic path')
    if dtype == torch.float32:  # bf16 rounds the float32 sums alike
        assert not torch.equal(scattered, emulated), (
            'the atomic path gave the deterministic bits: this comparison '
            'cannot tell which path ran')


@pytest.mark.parametrize(
    'dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_cuda_backward_is_bitwise_stable(cuda_kernel, random_inputs, dtype,
                                         deterministic_algorithms):
    inputs, grad_output = contended_case(random_inputs, dtype, 32)

    def gradients():
        return cuda_gradients(inputs, grad_output)

    first = gradients()
    for _ in range(3):
        for have, want in zip(gradients(), first):
            assert torch.equal(have, want)
    expected = reference_value_gradient(inputs, grad_output)
    torch.testing.assert_close(
        first[0].cpu().double(),
        expected,
        atol=8e-3 * expected.abs().max().item(),
        rtol=0)
