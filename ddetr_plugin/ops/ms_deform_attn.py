"""Multi-scale deformable attention: the Python front of the compiled op.

``ms_deform_attn`` validates its inputs, brings them to the layout and
dtypes the kernels expect and calls ``torch.ops.ddetr_plugin``. Its
autograd formula and its fake (meta) kernels are registered here with
``torch.library``, so the op works under ``torch.compile(fullgraph=True)``
and passes ``torch.library.opcheck``.

Where no compiled kernel can run (the extension is missing, or the device
has no kernel, e.g. MPS, or CUDA with a CPU-only build) the plain-PyTorch
reference computes the same result, and a warning says so once.
"""
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .checks import check_inputs
from .cuda_build import plan_cuda_build
from .extension import (extension_error, extension_loaded, kernel_device_types,
                        scan_kernel_devices)
from .reference import ms_deform_attn_reference

_HALF_TYPES = (torch.float16, torch.bfloat16)

# Device types already warned about falling back to the reference.
_warned_fallbacks = set()


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor,
                   level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention.

    Every query gathers, for each head, ``num_levels * num_points`` bilinear
    samples of the value (zero padding, ``align_corners=False``: location
    ``x`` in [0, 1] on a level of width ``w`` is pixel ``x * w - 0.5``) and
    sums them with the attention weights; locations outside the map, NaN or
    infinite read zeros. Same semantics as mmcv's
    ``multi_scale_deformable_attn_pytorch``.

    Non-contiguous inputs are accepted. On CPU, float16/bfloat16 inputs are
    computed in float32 and the result cast back; on CUDA the locations and
    weights are computed in float32 with a float16/bfloat16 value.

    Args:
        value (Tensor): (bs, num_keys, num_heads, head_dims), the keys of
            all levels flattened level after level.
        spatial_shapes (Tensor): (num_levels, 2), integer (h, w) of each
            level; sum(h * w) must equal num_keys.
        level_start_index (Tensor): (num_levels,), integer offset of each
            level in num_keys.
        sampling_locations (Tensor): (bs, num_queries, num_heads,
            num_levels, num_points, 2), normalised (x, y) in [0, 1].
        attention_weights (Tensor): (bs, num_queries, num_heads, num_levels,
            num_points).

    Returns:
        Tensor: (bs, num_queries, num_heads * head_dims) in the dtype of
        the value.

    Raises:
        TypeError: an input is not a tensor or has the wrong kind of dtype,
            or the floating dtypes disagree.
        ValueError: shapes, level sizes or devices of the inputs disagree.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights)
    device_type = value.device.type
    if device_type not in kernel_device_types():
        _warn_fallback(device_type)
        return _reference_in_compute_dtype(value, spatial_shapes,
                                           level_start_index,
                                           sampling_locations,
                                           attention_weights)

    output_dtype = value.dtype
    if value.dtype in _HALF_TYPES and device_type == 'cpu':
        value = value.float()
    # The kernels read fp32 coordinates with a half value: fp16 pixel
    # coordinates are too coarse for large maps.
    location_dtype = (
        torch.float32 if value.dtype in _HALF_TYPES else value.dtype)
    output = torch.ops.ddetr_plugin.ms_deform_attn_forward(
        value.contiguous(),
        spatial_shapes.to(torch.int64).contiguous(),
        level_start_index.to(torch.int64).contiguous(),
        sampling_locations.to(location_dtype).contiguous(),
        attention_weights.to(location_dtype).contiguous())
    return output.to(output_dtype)


def _reference_in_compute_dtype(value: Tensor, spatial_shapes: Tensor,
                                level_start_index: Tensor,
                                sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """The reference, in float32 when any input is float16/bfloat16.

    ``grid_sample`` needs one dtype for value and grid, and half-precision
    sampling coordinates would lose whole pixels on large maps.
    """
    output_dtype = value.dtype
    compute_dtype = value.dtype
    if value.dtype in _HALF_TYPES or sampling_locations.dtype in _HALF_TYPES:
        compute_dtype = torch.float32
    output = ms_deform_attn_reference(
        value.to(compute_dtype), spatial_shapes, level_start_index,
        sampling_locations.to(compute_dtype),
        attention_weights.to(compute_dtype))
    return output.to(output_dtype)


def _warn_fallback(device_type: str) -> None:
    """Say once per device type that the reference serves the op."""
    if device_type in _warned_fallbacks:
        return
    _warned_fallbacks.add(device_type)
    warnings.warn(
        f'ms_deform_attn: {_fallback_reason(device_type)}; using the slower '
        'plain-PyTorch reference.',
        stacklevel=3)


def _fallback_reason(device_type: str) -> str:
    """Why no compiled kernel serves ``device_type``, and what to do."""
    rebuild = ('rebuild with `pip install --no-build-isolation -e .` in the '
               'checkout')
    if not extension_loaded():
        return f'ddetr_plugin._C did not load ({extension_error()}); {rebuild}'
    reason = (f'ddetr_plugin._C has no kernel for {device_type} tensors '
              f'(kernels: {sorted(kernel_device_types())})')
    if device_type != 'cuda':
        return reason
    try:
        plan = plan_cuda_build()
    except RuntimeError as error:  # FORCE_CUDA=1 in the environment
        return f'{reason}: {error}'
    if plan.build_cuda:
        return f'{reason}; a build now would have them: {rebuild}'
    return f'{reason}: it was built without them, as {plan.reason}'


# ---------------------------------------------------------------------------
# torch.library registrations of the compiled op (only when it exists).


def _fake_forward(value: Tensor, spatial_shapes: Tensor,
                  level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    batch_size, _, num_heads, head_dims = value.shape
    num_queries = sampling_locations.shape[1]
    return value.new_empty((batch_size, num_queries, num_heads * head_dims))


def _fake_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                   level_start_index: Tensor, sampling_locations: Tensor,
                   attention_weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _setup_context(ctx, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output: Tensor) -> Tuple[Optional[Tensor], ...]:
    value, spatial_shapes, level_start_index, locations, weights = (
        ctx.saved_tensors)
    grad_value, grad_locations, grad_weights = (
        torch.ops.ddetr_plugin.ms_deform_attn_backward(
            grad_output.contiguous(), value, spatial_shapes, level_start_index,
            locations, weights))
    # The integer spatial_shapes and level_start_index have no gradient.
    return grad_value, None, None, grad_locations, grad_weights


def _register_operators() -> None:
    """Give the C++ op its fake kernels and its autograd formula."""
    torch.library.register_fake('ddetr_plugin::ms_deform_attn_forward',
                                _fake_forward)
    torch.library.register_fake('ddetr_plugin::ms_deform_attn_backward',
                                _fake_backward)
    torch.library.register_autograd(
        'ddetr_plugin::ms_deform_attn_forward',
        _backward,
        setup_context=_setup_context)
    # The fake kernels also serve meta tensors.
    scan_kernel_devices()


if extension_loaded():
    _register_operators()
