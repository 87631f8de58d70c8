"""Input validation of multi-scale deformable attention.

Kernels index memory with the sizes they are given, so every disagreement
between the inputs is caught here, before any kernel runs, with a message
that names the argument, what was expected and what was received. Nothing
here reads a CUDA tensor's values at every call (``level_table.py``).
"""
from typing import Optional, Sequence

import torch
from torch import Tensor

from .level_table import check_level_table

_HALF_TYPES = (torch.float16, torch.bfloat16)


def _format_shape(shape: Sequence[Optional[int]]) -> str:
    """``(2, None, 8)`` -> ``'(2, *, 8)'``: ``*`` is any size."""
    sizes = ['*' if size is None else str(int(size)) for size in shape]
    return '(' + ', '.join(sizes) + (',)' if len(sizes) == 1 else ')')


def _check_shape(name: str, tensor: Tensor, layout: str,
                 expected: Sequence[Optional[int]]) -> None:
    """Raise unless ``tensor`` has shape ``expected`` (None: any size)."""
    shape = tuple(tensor.shape)
    matches = len(shape) == len(expected) and all(
        want is None or have == want for have, want in zip(shape, expected))
    if not matches:
        raise ValueError(
            f'ms_deform_attn: {name} must have shape {layout} = '
            f'{_format_shape(expected)}, got {_format_shape(shape)}')


def check_inputs(value: Tensor, spatial_shapes: Tensor,
                 level_start_index: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor) -> None:
    """Check that the inputs of the op agree with each other.

    Args:
        value (Tensor): (bs, num_keys, num_heads, head_dims), floating point.
        spatial_shapes (Tensor): (num_levels, 2), integer (h, w) per level,
            with sum(h * w) == num_keys.
        level_start_index (Tensor): (num_levels,), integer, the exclusive
            cumulative sum of h * w.
        sampling_locations (Tensor): (bs, num_queries, num_heads, num_levels,
            num_points, 2), floating point, same dtype as the value, or
            float32 with a float16/bfloat16 value.
        attention_weights (Tensor): (bs, num_queries, num_heads, num_levels,
            num_points), same dtype as ``sampling_locations``.

    Raises:
        TypeError: an argument is not a tensor or has the wrong kind of
            dtype, or the floating dtypes disagree.
        ValueError: shapes or level sizes disagree, or the inputs are on
            different devices.
    """
    named = {
        'value': value,
        'spatial_shapes': spatial_shapes,
        'level_start_index': level_start_index,
        'sampling_locations': sampling_locations,
        'attention_weights': attention_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f'ms_deform_attn: {name} must be a Tensor, got '
                            f'{type(tensor).__name__}')
    for name in ('value', 'sampling_locations', 'attention_weights'):
        if not named[name].is_floating_point():
            raise TypeError(f'ms_deform_attn: {name} must be a floating-point '
                            f'tensor, got dtype {named[name].dtype}')
    for name in ('spatial_shapes', 'level_start_index'):
        tensor = named[name]
        if tensor.is_floating_point() or tensor.is_complex() or (
                tensor.dtype == torch.bool):
            raise TypeError(f'ms_deform_attn: {name} must be an integer '
                            f'tensor (int64), got dtype {tensor.dtype}')

    if value.dim() != 4:
        raise ValueError(
            'ms_deform_attn: value must have 4 dimensions (bs, num_keys, '
            f'num_heads, head_dims), got shape {_format_shape(value.shape)}')
    batch_size, num_keys, num_heads, _ = value.shape
    if spatial_shapes.dim() != 2:
        raise ValueError(
            'ms_deform_attn: spatial_shapes must have shape (num_levels, 2), '
            f'got {_format_shape(spatial_shapes.shape)}')
    num_levels = spatial_shapes.shape[0]
    _check_shape('spatial_shapes', spatial_shapes, '(num_levels, 2)',
                 (num_levels, 2))
    _check_shape('level_start_index', level_start_index, '(num_levels,)',
                 (num_levels, ))
    _check_shape(
        'sampling_locations', sampling_locations,
        '(bs, num_queries, num_heads, num_levels, num_points, 2) with bs '
        'and num_heads from value and num_levels from spatial_shapes',
        (batch_size, None, num_heads, num_levels, None, 2))
    _check_shape(
        'attention_weights', attention_weights,
        '(bs, num_queries, num_heads, num_levels, num_points) as in '
        'sampling_locations', sampling_locations.shape[:5])

    if sampling_locations.dtype != attention_weights.dtype:
        raise TypeError(
            'ms_deform_attn: sampling_locations and attention_weights must '
            f'share a dtype, got {sampling_locations.dtype} and '
            f'{attention_weights.dtype}')
    mixed_precision = (
        value.dtype in _HALF_TYPES
        and sampling_locations.dtype == torch.float32)
    if value.dtype != sampling_locations.dtype and not mixed_precision:
        raise TypeError(
            'ms_deform_attn: value and sampling_locations must share a dtype '
            '(or be float16/bfloat16 and float32), got '
            f'{value.dtype} and {sampling_locations.dtype}')

    for name, tensor in named.items():
        if tensor.device != value.device:
            raise ValueError(
                'ms_deform_attn: all inputs must be on one device; value is '
                f'on {value.device} but {name} is on {tensor.device}')

    # Needs the table's values: checked without waiting for the GPU, and
    # skipped while tracing (level_table.py).
    check_level_table(spatial_shapes, level_start_index, num_keys)
