"""Raw op calls with inconsistent level tables stay inside the tensors.

``torch.ops.ddetr_plugin.*`` can be called without the front's checks.
The CPU kernels read the table on the host and raise; the CUDA launcher
cannot read it without a sync, so its kernels skip every level that does not
fit in the keys (no read, no write, zero gradients for its samples). The
CUDA half runs in the CPU emulation, with NaN around the value (a read
outside shows in the output) and canaries around every output (a write
outside raises).
"""
import pytest
import torch

from testkit import needs_extension

# Default inputs: 20 keys over levels (3, 5), (1, 1), (2, 2) at 0, 15, 16.
# Each case: (spatial_shapes, level_start_index, the level that does not
# fit).
BAD_TABLES = {
    'past the end': ([[3, 5], [1, 1], [3, 3]], [0, 15, 16], 2),
    'negative start': ([[3, 5], [1, 1], [2, 2]], [0, -4, 16], 1),
    'start past the keys': ([[3, 5], [1, 1], [2, 2]], [0, 25, 16], 1),
    'negative size': ([[-3, 5], [1, 1], [2, 2]], [0, 15, 16], 0),
    # 2^62 * 4 wraps to 0 in int64: a check of start + h * w passes it.
    'overflowing size': ([[2**62, 4], [1, 1], [2, 2]], [0, 15, 16], 0),
}


def bad_inputs(random_inputs, name, dtype=torch.float64):
    value, _, _, locations, weights = random_inputs(dtype=dtype)
    shapes, starts, bad_level = BAD_TABLES[name]
    return [
        value,
        torch.tensor(shapes),
        torch.tensor(starts), locations, weights
    ], bad_level


@needs_extension
@pytest.mark.parametrize('name', list(BAD_TABLES))
def test_cpu_kernels_refuse_levels_outside_the_keys(random_inputs, name):
    inputs, bad_level = bad_inputs(random_inputs, name)
    grad_output = torch.zeros(2, 3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f'level {bad_level} of size'):
        torch.ops.ddetr_plugin.ms_deform_attn_forward(*inputs)
    with pytest.raises(RuntimeError, match='does not fit in the 20 keys'):
        torch.ops.ddetr_plugin.ms_deform_attn_backward(grad_output, *inputs)


def select_levels(inputs, levels):
    """The same problem restricted to ``levels`` (positions in the table).
    """
    value, shapes, starts, locations, weights = inputs
    index = torch.tensor(levels, device=value.device)
    return [
        value, shapes[index].contiguous(), starts[index].contiguous(),
        locations[:, :, :, index].contiguous(), weights[:, :, :,
                                                        index].contiguous()
    ]


@needs_extension
def test_cpu_backward_sums_overlapping_levels(random_inputs):
    # Level 2 covers the keys of level 0 again. Tasks split by level groups
    # would race on those keys, and zeroing each group's keys would erase
    # the other's sums.
    value, _, _, locations, weights = random_inputs(batch_size=1)
    inputs = [
        value,
        torch.tensor([[3, 5], [1, 1], [3, 5]]),
        torch.tensor([0, 15, 0]), locations, weights
    ]
    grad_output = torch.randn(1, 3, 8, dtype=torch.float64)
    backward = torch.ops.ddetr_plugin.ms_deform_attn_backward
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        grads = backward(grad_output, *inputs)
        first = backward(grad_output, *select_levels(inputs, [0, 1]))
        second = backward(grad_output, *select_levels(inputs, [2]))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(
        grads[0], first[0] + second[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(grads[1][:, :, :, :2], first[1])
    torch.testing.assert_close(grads[1][:, :, :, 2:], second[1])


def nan_surrounded(tensor):
    """``tensor`` copied into the middle of a NaN buffer."""
    margin = 4096
    storage = torch.full((tensor.numel() + 2 * margin, ),
                         float('nan'),
                         dtype=tensor.dtype)
    inner = storage[margin:margin + tensor.numel()].view(tensor.shape)
    return inner.copy_(tensor)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16])
@pytest.mark.parametrize('name', list(BAD_TABLES))
def test_emulated_kernels_skip_levels_outside_the_keys(emulator, random_inputs,
                                                       name, dtype):
    inputs, bad_level = bad_inputs(random_inputs, name, torch.float64)
    coordinate_dtype = torch.float32
    value, shapes, starts, locations, weights = inputs
    inputs = [
        nan_surrounded(value.to(dtype)), shapes, starts,
        locations.to(coordinate_dtype),
        weights.to(coordinate_dtype)
    ]
    grad_output = torch.randn(2, 3, 8).to(dtype)
    # The emulator raises if an output's canaries changed.
    output, _ = emulator.forward(*inputs)
    grad_value, grad_locations, grad_weights, _, _ = emulator.backward(
        grad_output, *inputs)
    # The same call without the bad level: the good levels fit, so it is a
    # valid problem for the kernels.
    kept = [level for level in range(3) if level != bad_level]
    expected_output, _ = emulator.forward(*select_levels(inputs, kept))
    expected = emulator.backward(grad_output, *select_levels(inputs, kept))
    assert torch.isfinite(output).all()
    assert torch.equal(output, expected_output)
    assert torch.equal(grad_value, expected[0])
    assert torch.equal(grad_locations[:, :, :, kept], expected[1])
    assert torch.equal(grad_weights[:, :, :, kept], expected[2])
    # The bad level's samples read nothing and have no slope.
    assert (grad_locations[:, :, :, bad_level] == 0).all()
    assert (grad_weights[:, :, :, bad_level] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize('name', list(BAD_TABLES))
def test_cuda_kernels_skip_levels_outside_the_keys(cuda_kernel, random_inputs,
                                                   name):
    inputs, bad_level = bad_inputs(random_inputs, name, torch.float32)
    inputs = [tensor.cuda() for tensor in inputs]
    grad_output = torch.randn(2, 3, 8, device='cuda')
    forward = torch.ops.ddetr_plugin.ms_deform_attn_forward
    backward = torch.ops.ddetr_plugin.ms_deform_attn_backward
    output = forward(*inputs)
    grads = backward(grad_output, *inputs)
    kept = [level for level in range(3) if level != bad_level]
    expected_output = forward(*select_levels(inputs, kept))
    expected = backward(grad_output, *select_levels(inputs, kept))
    torch.cuda.synchronize()
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(grads[0], expected[0])
    torch.testing.assert_close(grads[1][:, :, :, kept], expected[1])
    assert (grads[1][:, :, :, bad_level] == 0).all()
    assert (grads[2][:, :, :, bad_level] == 0).all()
