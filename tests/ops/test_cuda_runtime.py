"""The CUDA path at run time: no host syncs, CUDA graphs.

These need a GPU with the CUDA kernels built, and skip cleanly otherwise
(nothing here touches CUDA at import time). The CPU half of the no-sync
proof is ``test_level_table.py``.
"""
import pytest
import torch

from ddetr_plugin.ops import ms_deform_attn

FORWARD_OPERATOR = 'ddetr_plugin::ms_deform_attn_forward'


@pytest.fixture(name='cuda_inputs')
def cuda_inputs_fixture(cuda_kernel, random_inputs):
    """Small float32 inputs on the GPU; ``cuda_kernel`` skips, saying
    what is missing, where the CUDA kernels cannot run."""
    inputs = random_inputs(
        batch_size=2,
        level_shapes=((8, 8), (4, 4), (2, 2)),
        num_queries=50,
        num_heads=4,
        head_dims=32,
        num_points=4,
        dtype=torch.float32)
    return [tensor.cuda() for tensor in inputs]


def leaves_of(inputs):
    """Floating inputs as leaves that require grad; the level table as it
    is (the same tensors, so a checked table is remembered)."""
    return [
        tensor.detach().clone().requires_grad_()
        if tensor.is_floating_point() else tensor for tensor in inputs
    ]


def forward_backward(inputs):
    output = ms_deform_attn(*inputs)
    output.sum().backward()
    return output


def test_inference_mode_calls_neither_raise_nor_sync(cuda_inputs):
    # Tensors made under torch.inference_mode() have no version counter
    # (reading it raises): their tables are checked on the device at every
    # call, never remembered, and the host never waits.
    expected = ms_deform_attn(*cuda_inputs)
    torch.cuda.synchronize()
    with torch.inference_mode():
        inputs = [tensor.clone() for tensor in cuda_inputs]
        torch.cuda.set_sync_debug_mode('error')
        try:
            outputs = [ms_deform_attn(*inputs) for _ in range(2)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=0, rtol=0)


def test_no_sync_once_the_table_was_checked(cuda_inputs):
    forward_backward(leaves_of(cuda_inputs))  # checks the table once
    torch.cuda.synchronize()
    leaves = leaves_of(cuda_inputs)
    torch.cuda.set_sync_debug_mode('error')
    try:
        forward_backward(leaves)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()
    assert leaves[0].grad is not None


def test_no_sync_for_a_new_table_under_sync_debug_mode(cuda_inputs):
    # A table never seen is checked on the device instead of the host.
    fresh = [tensor.clone() for tensor in cuda_inputs]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        forward_backward(leaves_of(fresh))
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.cuda.synchronize()


def test_cuda_graph_replays_forward_and_backward(cuda_inputs):
    static = leaves_of(cuda_inputs)
    # Warm up on a side stream, as torch.cuda.graphs recommends.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for leaf in (static[0], static[3], static[4]):
                leaf.grad = None
            forward_backward(static)
    torch.cuda.current_stream().wait_stream(stream)
    for leaf in (static[0], static[3], static[4]):
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_output = forward_backward(static)
    # New values in the captured input buffers, then replay.
    generator = torch.Generator().manual_seed(3)
    for index in (0, 3, 4):
        fresh = torch.rand(
            static[index].shape, generator=generator).to(static[index])
        static[index].data.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    expected = leaves_of([tensor.detach() for tensor in static])
    expected_output = forward_backward(expected)
    torch.testing.assert_close(static_output, expected_output)
    for index in (0, 3, 4):
        torch.testing.assert_close(static[index].grad, expected[index].grad)
