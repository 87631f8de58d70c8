"""Numerics of ``ddetr_plugin.ops.ms_deform_attn`` against the reference.

Parity tests call the front, so they run with or without the compiled
extension (without it the front serves the reference and they check the
dtype handling around it); checks of the compiled op itself skip when the
extension did not load.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ddetr_plugin.ops import (extension_error, ms_deform_attn,
                              ms_deform_attn_reference)
from testkit import needs_extension

# (atol, rtol) of the comparisons with the reference per dtype.
TOLERANCES = {torch.float64: (1e-10, 0.0), torch.float32: (2e-5, 1e-5)}


def with_grad(tensors):
    """Leaf copies of the floating inputs that require grad."""
    return [
        tensor.detach().clone().requires_grad_(tensor.is_floating_point())
        for tensor in tensors
    ]


def gradients(function, inputs, grad_output):
    """(output, grad of value, grad of locations, grad of weights)."""
    inputs = with_grad(inputs)
    output = function(*inputs)
    output.backward(grad_output)
    return output, inputs[0].grad, inputs[3].grad, inputs[4].grad


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('head_dims', [1, 30, 32, 71, 1025])
def test_forward_matches_reference(random_inputs, head_dims, dtype):
    inputs = random_inputs(head_dims=head_dims, dtype=dtype)
    atol, rtol = TOLERANCES[dtype]
    output = ms_deform_attn(*inputs)
    assert output.shape == (2, 3, 2 * head_dims)
    assert output.dtype == dtype
    torch.testing.assert_close(
        output, ms_deform_attn_reference(*inputs), atol=atol, rtol=rtol)


@pytest.mark.parametrize('batch_size', [1, 2, 3, 4, 5])
def test_batch_sizes_match_reference(random_inputs, batch_size):
    inputs = random_inputs(batch_size=batch_size, seed=batch_size)
    torch.testing.assert_close(
        ms_deform_attn(*inputs),
        ms_deform_attn_reference(*inputs),
        atol=1e-10,
        rtol=0)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_borders_and_outside_match_reference(random_inputs, border_locations,
                                             dtype):
    # A single-pixel level, a non-square one and a one-column one.
    level_shapes = [(1, 1), (2, 3), (4, 1)]
    inputs = random_inputs(
        batch_size=2,
        level_shapes=level_shapes,
        num_queries=10,
        num_points=10,
        head_dims=5,
        dtype=dtype)
    inputs[3] = border_locations(level_shapes, 2, 2).to(dtype)
    atol, rtol = TOLERANCES[dtype]
    output = ms_deform_attn(*inputs)
    torch.testing.assert_close(
        output, ms_deform_attn_reference(*inputs), atol=atol, rtol=rtol)
    # Query 7 samples x = -1 and query 8 x = 2 on every level: far outside.
    assert torch.equal(output[:, 7:9], torch.zeros_like(output[:, 7:9]))
    assert output[:, 9].abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_border_gradients_match_reference(random_inputs, border_locations,
                                          dtype):
    # Power-of-two sizes make every special location and its pixel
    # coordinate exact in both implementations, so both take the same side
    # of each kink (integer pixel coordinate), including the slope of a
    # sample at pixel -1, which reads zero but leans on the map.
    level_shapes = [(1, 1), (2, 4), (4, 2)]
    inputs = random_inputs(
        level_shapes=level_shapes,
        num_queries=10,
        num_points=10,
        head_dims=3,
        dtype=dtype)
    inputs[3] = border_locations(level_shapes, 2, 2).to(dtype)
    grad_output = torch.randn(2, 10, 6, dtype=dtype)
    expected = gradients(ms_deform_attn_reference, inputs, grad_output)
    actual = gradients(ms_deform_attn, inputs, grad_output)
    atol, rtol = TOLERANCES[dtype]
    for name, have, want in zip(('output', 'value', 'locations', 'weights'),
                                actual, expected):
        torch.testing.assert_close(
            have, want, atol=atol, rtol=rtol, msg=lambda m: f'{name}: {m}')
    # Query 2 samples x = -0.5 / w, i.e. pixel -1: zero value, yet a
    # non-zero slope along x on the levels wider than one pixel.
    assert actual[2][:, 2, :, 1:, :, 0].abs().sum() > 0


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
@pytest.mark.parametrize('head_dims', [1, 32, 71])
def test_backward_matches_reference(random_inputs, head_dims, dtype):
    inputs = random_inputs(head_dims=head_dims, dtype=dtype, seed=head_dims)
    grad_output = torch.randn(2, 3, 2 * head_dims, dtype=dtype)
    expected = gradients(ms_deform_attn_reference, inputs, grad_output)
    actual = gradients(ms_deform_attn, inputs, grad_output)
    atol, rtol = TOLERANCES[dtype]
    if dtype == torch.float32:
        # Location gradients scale with the level size.
        atol = 1e-4
    for name, have, want in zip(('output', 'value', 'locations', 'weights'),
                                actual, expected):
        torch.testing.assert_close(
            have, want, atol=atol, rtol=rtol, msg=lambda m: f'{name}: {m}')


def test_gradcheck(random_inputs, off_kink_locations):
    inputs = random_inputs(
        level_shapes=[(3, 4), (2, 2), (1, 1)], head_dims=3, num_queries=3)
    inputs[3] = off_kink_locations(inputs[1], tuple(inputs[4].shape))
    value, spatial_shapes, level_start_index, locations, weights = with_grad(
        inputs)

    def function(value, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index,
                              locations, weights)

    assert torch.autograd.gradcheck(
        function, (value, locations, weights), eps=1e-6, atol=1e-7)


def test_nan_and_inf_locations_read_zeros(random_inputs):
    inputs = random_inputs(num_queries=4, num_points=3)
    bad = [float('nan'), float('inf'), float('-inf'), 1e30]
    corrupted = inputs[3].clone()
    for index, number in enumerate(bad):
        corrupted[0, index, 1, 0, 1, index % 2] = number
    # The same samples, far outside the map instead.
    outside = torch.where(
        torch.isfinite(corrupted).all(-1, keepdim=True)
        & (corrupted.abs() < 1e3).all(-1, keepdim=True), corrupted,
        torch.full_like(corrupted, 5.0))
    grad_output = torch.randn(2, 4, 8, dtype=torch.float64)
    args = inputs[:3] + [corrupted, inputs[4]]
    actual = gradients(ms_deform_attn, args, grad_output)
    expected = gradients(ms_deform_attn, inputs[:3] + [outside, inputs[4]],
                         grad_output)
    for have, want in zip(actual, expected):
        assert torch.isfinite(have).all()
        torch.testing.assert_close(have, want, atol=0, rtol=0)
    torch.testing.assert_close(
        actual[0], ms_deform_attn_reference(*args), atol=1e-10, rtol=0)


def test_non_contiguous_inputs(random_inputs):
    inputs = random_inputs(head_dims=6)
    expected = ms_deform_attn(*inputs)
    value, spatial_shapes, level_start_index, locations, weights = inputs
    # Same values behind transposed / strided storage.
    value_t = value.transpose(1, 2).contiguous().transpose(1, 2)
    locations_t = torch.stack([locations, -locations], dim=-1)[..., 0]
    weights_t = torch.stack([weights, -weights], dim=-1)[..., 0]
    for tensor in (value_t, locations_t, weights_t):
        assert not tensor.is_contiguous()
    output = ms_deform_attn(value_t, spatial_shapes, level_start_index,
                            locations_t, weights_t)
    torch.testing.assert_close(output, expected, atol=0, rtol=0)


def test_empty_query_set(random_inputs):
    inputs = random_inputs(num_queries=0, head_dims=5)
    value, spatial_shapes, level_start_index, locations, weights = with_grad(
        inputs)
    output = ms_deform_attn(value, spatial_shapes, level_start_index,
                            locations, weights)
    assert output.shape == (2, 0, 10)
    output.sum().backward()
    assert torch.equal(value.grad, torch.zeros_like(value))
    assert locations.grad.shape == locations.shape
    assert weights.grad.shape == weights.shape


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(random_inputs, dtype):
    inputs = random_inputs(head_dims=8, dtype=torch.float32)
    expected = ms_deform_attn_reference(*inputs)
    half_value = inputs[0].to(dtype)
    # A half value with float32 locations and weights (mixed precision) and
    # everything in half both work and return the value's dtype.
    for locations, weights in ((inputs[3], inputs[4]), (inputs[3].to(dtype),
                                                        inputs[4].to(dtype))):
        output = ms_deform_attn(half_value, inputs[1], inputs[2], locations,
                                weights)
        assert output.dtype == dtype
        torch.testing.assert_close(
            output.float(), expected, atol=5e-2, rtol=2e-2)


def test_fallback_gives_the_same_answer(random_inputs, monkeypatch):
    inputs = random_inputs(head_dims=7)
    grad_output = torch.randn(2, 3, 14, dtype=torch.float64)
    compiled = gradients(ms_deform_attn, inputs, grad_output)
    front = pytest.importorskip('ddetr_plugin.ops.ms_deform_attn')
    # As on a device without a kernel: the front must use the reference.
    monkeypatch.setattr(front, 'kernel_device_types', lambda: frozenset())
    monkeypatch.setattr(front, '_warned_fallbacks', set())
    with pytest.warns(UserWarning, match='plain-PyTorch reference'):
        fallback = gradients(ms_deform_attn, inputs, grad_output)
    for have, want in zip(fallback, compiled):
        torch.testing.assert_close(have, want, atol=1e-10, rtol=0)


@needs_extension
def test_extension_state():
    assert extension_error() is None
    assert hasattr(torch.ops.ddetr_plugin, 'ms_deform_attn_backward')


@needs_extension
@pytest.mark.parametrize('batch_size, num_heads', [(3, 3), (1, 1)])
def test_backward_independent_of_thread_count(random_inputs, batch_size,
                                              num_heads):
    # grad_value is scattered from many queries; a race would make the
    # result depend on the number of threads. With a single (image, head)
    # pair the levels are split between the threads instead.
    inputs = random_inputs(
        batch_size=batch_size,
        num_queries=40,
        num_heads=num_heads,
        num_points=4,
        seed=3)
    grad_output = torch.randn(
        batch_size, 40, 4 * num_heads, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.ddetr_plugin.ms_deform_attn_backward(
            grad_output, *inputs)
        torch.set_num_threads(max(2, threads))
        many = torch.ops.ddetr_plugin.ms_deform_attn_backward(
            grad_output, *inputs)
    finally:
        torch.set_num_threads(threads)
    for have, want in zip(many, single):
        assert torch.equal(have, want)
    expected = gradients(ms_deform_attn_reference, inputs, grad_output)[1:]
    for have, want in zip(many, expected):
        torch.testing.assert_close(have, want, atol=1e-10, rtol=0)


@needs_extension
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_opcheck(random_inputs, dtype):
    inputs = with_grad(random_inputs(dtype=dtype))
    torch.library.opcheck(torch.ops.ddetr_plugin.ms_deform_attn_forward,
                          tuple(inputs))
    grad_output = torch.randn(2, 3, 8, dtype=dtype)
    torch.library.opcheck(torch.ops.ddetr_plugin.ms_deform_attn_backward,
                          (grad_output, *[t.detach() for t in inputs]))


def attention_block(value, spatial_shapes, level_start_index, locations,
                    weights):
    """A small function around the op, as a layer would use it."""
    weights = weights.softmax(-1)
    output = ms_deform_attn(value * 2, spatial_shapes, level_start_index,
                            locations.sigmoid(), weights)
    return output.relu().sum(-1)


@needs_extension
def test_compile_fullgraph_with_backward(random_inputs):
    inputs = random_inputs(dtype=torch.float32)
    torch._dynamo.reset()
    # aot_eager traces forward and backward through the fake kernels and
    # the registered autograd formula; fullgraph fails on any graph break.
    compiled = torch.compile(
        attention_block, fullgraph=True, backend='aot_eager')
    grad_output = torch.randn(2, 3)
    expected = gradients(attention_block, inputs, grad_output)
    actual = gradients(compiled, inputs, grad_output)
    for have, want in zip(actual, expected):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


@needs_extension
@pytest.mark.slow
def test_compile_fullgraph_inductor(random_inputs):
    # The default backend (inductor) generates and compiles C++ for the
    # surrounding ops: about half a minute on two cores.
    inputs = random_inputs(dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(attention_block, fullgraph=True)
    torch.testing.assert_close(
        compiled(*inputs), attention_block(*inputs), atol=1e-5, rtol=1e-5)


@needs_extension
def test_meta_tensors_give_the_output_shape(random_inputs):
    # Shape inference (e.g. model summaries) runs the fake kernel.
    inputs = [tensor.to('meta') for tensor in random_inputs(head_dims=5)]
    output = ms_deform_attn(*inputs)
    assert output.device.type == 'meta'
    assert output.shape == (2, 3, 10) and output.dtype == torch.float64


def test_missing_extension_falls_back_without_raising(tmp_path):
    # A fresh interpreter in which ddetr_plugin._C cannot be imported, as in
    # a checkout that was never built: importing must not raise, the state
    # must say why, and the op must still answer (through the reference).
    script = tmp_path / 'no_extension.py'
    script.write_text('\n'.join([
        'import sys, warnings',
        "sys.modules['ddetr_plugin._C'] = None",
        'import torch',
        'from ddetr_plugin.ops import (extension_error, extension_loaded,',
        '                              ms_deform_attn,',
        '                              ms_deform_attn_reference)',
        'assert not extension_loaded()',
        "assert 'ddetr_plugin._C' in extension_error(), extension_error()",
        'value = torch.randn(1, 5, 2, 3, dtype=torch.float64)',
        'shapes = torch.tensor([[1, 1], [2, 2]])',
        'starts = torch.tensor([0, 1])',
        'locations = torch.rand(1, 4, 2, 2, 3, 2, dtype=torch.float64)',
        'weights = torch.rand(1, 4, 2, 2, 3, dtype=torch.float64)',
        'args = (value, shapes, starts, locations, weights)',
        'with warnings.catch_warnings(record=True) as caught:',
        "    warnings.simplefilter('always')",
        '    first = ms_deform_attn(*args)',
        '    second = ms_deform_attn(*args)',
        'messages = [str(w.message) for w in caught',
        "            if 'plain-PyTorch reference' in str(w.message)]",
        'assert len(messages) == 1, messages',
        "assert 'did not load' in messages[0], messages",
        'assert torch.equal(first, ms_deform_attn_reference(*args))',
        'assert torch.equal(first, second)',
        "print('fallback ok')",
    ]))
    repository = pathlib.Path(__file__).resolve().parents[2]
    environment = dict(os.environ)
    environment['PYTHONPATH'] = os.pathsep.join(
        [str(repository), environment.get('PYTHONPATH', '')])
    result = subprocess.run([sys.executable, str(script)],
                            capture_output=True,
                            text=True,
                            env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'fallback ok' in result.stdout
