"""Bad inputs to ``ms_deform_attn`` raise errors that name the problem."""
import re

import pytest
import torch

from ddetr_plugin.ops import ms_deform_attn


def replace(inputs, index, tensor):
    inputs = list(inputs)
    inputs[index] = tensor
    return inputs


# Each case: (id, how to break the default inputs, exception type, fragments
# the message must contain). Default inputs: value (2, 20, 2, 4) over levels
# (3, 5), (1, 1), (2, 2); locations (2, 3, 2, 3, 2, 2); weights (2, 3, 2, 3,
# 2).
BAD_INPUTS = [
    ('value rank', lambda x: replace(x, 0, x[0][0]), ValueError,
     ['value', '4 dimensions', '(20, 2, 4)']),
    ('keys not tiled', lambda x: replace(x, 0, x[0][:, :-1]), ValueError,
     ['spatial_shapes', 'is 20', 'num_keys = 19']),
    ('heads disagree', lambda x: replace(x, 3, x[3][:, :, :1]), ValueError,
     ['sampling_locations', '(2, *, 2, 3, *, 2)', 'got (2, 3, 1, 3, 2, 2)']),
    ('levels disagree', lambda x: replace(x, 3, x[3][:, :, :, :2]), ValueError,
     ['sampling_locations', '(2, *, 2, 3, *, 2)', 'got (2, 3, 2, 2, 2, 2)']),
    ('points disagree', lambda x: replace(x, 4, x[4][..., :1]), ValueError,
     ['attention_weights', '(2, 3, 2, 3, 2)', 'got (2, 3, 2, 3, 1)']),
    ('batch disagrees', lambda x: replace(x, 4, x[4][:1]), ValueError,
     ['attention_weights', '(2, 3, 2, 3, 2)', 'got (1, 3, 2, 3, 2)']),
    ('coordinate pairs', lambda x: replace(x, 3, torch.cat([x[3], x[3]], -1)),
     ValueError, ['sampling_locations', 'got (2, 3, 2, 3, 2, 4)']),
    ('level shape rank', lambda x: replace(x, 1, x[1].flatten()), ValueError,
     ['spatial_shapes', '(num_levels, 2)', 'got (6,)']),
    ('level starts', lambda x: replace(x, 2, torch.tensor([0, 16, 15])),
     ValueError, ['level_start_index', '[0, 15, 16]', 'got [0, 16, 15]']),
    ('level start count', lambda x: replace(x, 2, x[2][:2]), ValueError,
     ['level_start_index', '(3,)', 'got (2,)']),
    ('negative size',
     lambda x: replace(x, 1, torch.tensor([[-3, -5], [1, 1], [2, 2]])),
     ValueError, ['spatial_shapes', '>= 0']),
    ('float dtypes', lambda x: replace(x, 3, x[3].float()), TypeError, [
        'sampling_locations', 'attention_weights', 'torch.float32',
        'torch.float64'
    ]),
    ('value dtype',
     lambda x: replace(replace(x, 3, x[3].float()), 4, x[4].float()),
     TypeError,
     ['value', 'sampling_locations', 'torch.float64', 'torch.float32']),
    ('integer value', lambda x: replace(x, 0, x[0].long()), TypeError,
     ['value', 'floating-point', 'torch.int64']),
    ('float level sizes', lambda x: replace(x, 1, x[1].double()), TypeError,
     ['spatial_shapes', 'integer', 'torch.float64']),
    ('not a tensor', lambda x: replace(x, 1, [[3, 5], [1, 1], [2, 2]]),
     TypeError, ['spatial_shapes', 'Tensor', 'list']),
    ('devices', lambda x: replace(x, 4, x[4].to('meta')), ValueError,
     ['attention_weights', 'meta', 'cpu']),
]


@pytest.mark.parametrize(
    'corrupt, error, fragments', [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(random_inputs, corrupt, error,
                                       fragments):
    inputs = corrupt(random_inputs())
    with pytest.raises(error) as raised:
        ms_deform_attn(*inputs)
    message = str(raised.value)
    assert message.startswith('ms_deform_attn:')
    for fragment in fragments:
        assert fragment in message, f'{fragment!r} not in {message!r}'


def test_int32_level_tensors_are_accepted(random_inputs):
    inputs = random_inputs()
    expected = ms_deform_attn(*inputs)
    output = ms_deform_attn(inputs[0], inputs[1].int(), inputs[2].int(),
                            *inputs[3:])
    torch.testing.assert_close(output, expected, atol=0, rtol=0)


def test_compiled_kernel_rejects_what_the_front_would_convert(random_inputs):
    ops = pytest.importorskip('ddetr_plugin.ops')
    if not ops.extension_loaded():
        pytest.skip(f'ddetr_plugin._C did not load: {ops.extension_error()}')
    inputs = random_inputs()
    # Calling the raw op with a transposed value must fail loudly rather
    # than read the wrong memory.
    value = inputs[0].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(RuntimeError, match=re.escape('contiguous')):
        torch.ops.ddetr_plugin.ms_deform_attn_forward(value, *inputs[1:])


def test_compiled_kernel_rejects_levels_past_the_keys(random_inputs):
    ops = pytest.importorskip('ddetr_plugin.ops')
    if not ops.extension_loaded():
        pytest.skip(f'ddetr_plugin._C did not load: {ops.extension_error()}')
    value, spatial_shapes, level_start_index, locations, weights = (
        random_inputs())
    # 20 keys; a last level of 3 x 3 starting at key 16 would reach key 25.
    too_large = torch.tensor([[3, 5], [1, 1], [3, 3]])
    grad_output = torch.zeros(2, 3, 8, dtype=torch.float64)
    for call in (lambda: torch.ops.ddetr_plugin.ms_deform_attn_forward(
            value, too_large, level_start_index, locations, weights),
                 lambda: torch.ops.ddetr_plugin.ms_deform_attn_backward(
                     grad_output, value, too_large, level_start_index,
                     locations, weights)):
        with pytest.raises(RuntimeError, match='does not fit in the 20 keys'):
            call()


def test_compiled_backward_zeroes_keys_outside_every_level(random_inputs):
    ops = pytest.importorskip('ddetr_plugin.ops')
    if not ops.extension_loaded():
        pytest.skip(f'ddetr_plugin._C did not load: {ops.extension_error()}')
    value, spatial_shapes, level_start_index, locations, weights = (
        random_inputs())
    grad_output = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = torch.ops.ddetr_plugin.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, locations,
        weights)
    # Two keys past the last level: the raw op allows them (the front does
    # not); their gradient must be zero, not whatever memory held.
    padded = torch.cat([value, torch.randn_like(value[:, :2])], dim=1)
    grads = torch.ops.ddetr_plugin.ms_deform_attn_backward(
        grad_output, padded, spatial_shapes, level_start_index, locations,
        weights)
    assert torch.equal(grads[0][:, 20:], torch.zeros_like(padded[:, 20:]))
    torch.testing.assert_close(grads[0][:, :20], expected[0], atol=0, rtol=0)
    for have, want in zip(grads[1:], expected[1:]):
        torch.testing.assert_close(have, want, atol=0, rtol=0)
