"""Checking the level table without stalling the GPU.

The level table is the pair ``spatial_shapes`` (num_levels, 2) and
``level_start_index`` (num_levels,). Whether it tiles the keys of the value
depends on its values. Reading them on the host from a CUDA tensor waits
for every queued kernel (a device-to-host sync): before, that happened at
every call of the op, which blocks CUDA-graph capture and stalls short
decoder calls.

So the check runs:

- on the host where reading is free (CPU tensors);
- once per table on other devices: a table that passed is remembered (by
  identity and version counter, so an in-place change is checked again),
  and Deformable DETR builds one table per forward for its twelve
  attention layers;
- on the device, with ``torch._assert_async``, where the host may not wait
  (CUDA-graph capture, or ``torch.cuda.set_sync_debug_mode`` set);
- not at all while tracing (``torch.compile``, ``torch.export``, fake or
  meta tensors), where the values are unknown.

The compiled kernels bound every level by themselves (a level outside the
keys reads and writes nothing), so a table that escapes the check gives
wrong numbers, never memory errors.
"""
import weakref
from typing import Dict, List, Tuple

import torch
from torch import Tensor

try:  # private, but the only way to recognise fake tensors outside dynamo
    from torch._subclasses.fake_tensor import is_fake
except ImportError:  # pragma: no cover - older or newer torch

    def is_fake(tensor: Tensor) -> bool:
        return False


# Tables that passed, by (id(spatial_shapes), id(level_start_index)): weak
# references to both (an id may be reused once a tensor dies), their
# version counters and the number of keys they were checked against.
_MAX_REMEMBERED = 32
_checked: Dict[Tuple[int, int], tuple] = {}


def is_tracing(*tensors: Tensor) -> bool:
    """Whether the values of ``tensors`` are unknown (traced or fake)."""
    if torch.compiler.is_compiling():
        return True
    return any(tensor.device.type == 'meta' or is_fake(tensor)
               for tensor in tensors)


def reading_syncs(device: torch.device) -> bool:
    """Whether reading a tensor's values on the host waits for the device."""
    return device.type not in ('cpu', 'meta')


def host_may_wait(device: torch.device) -> bool:
    """False while a device-to-host sync would break something: during
    CUDA-graph capture, or when ``torch.cuda.set_sync_debug_mode`` asks to
    warn or fail on syncs."""
    if device.type != 'cuda':
        return True
    return (not torch.cuda.is_current_stream_capturing()
            and torch.cuda.get_sync_debug_mode() == 0)


def check_level_table(spatial_shapes: Tensor, level_start_index: Tensor,
                      num_keys: int) -> None:
    """Check that the levels tile the ``num_keys`` keys of the value.

    Args:
        spatial_shapes (Tensor): (num_levels, 2), integer (h, w) per level.
        level_start_index (Tensor): (num_levels,), integer offset of each
            level in the keys.
        num_keys (int): number of keys of the value.

    Raises:
        ValueError: the table does not tile the keys (host check).
        RuntimeError: the same, from the device check on CPU tensors; on
            CUDA the device check fails the next synchronising call.
    """
    if is_tracing(spatial_shapes, level_start_index):
        return
    if not reading_syncs(spatial_shapes.device):
        _check_on_host(spatial_shapes, level_start_index, num_keys)
        return
    key = (id(spatial_shapes), id(level_start_index))
    if _remembered(key, spatial_shapes, level_start_index, num_keys):
        return
    if host_may_wait(spatial_shapes.device):
        _check_on_host(spatial_shapes, level_start_index, num_keys)
    else:
        _check_on_device(spatial_shapes, level_start_index, num_keys)
    _remember(key, spatial_shapes, level_start_index, num_keys)


def forget_checked_tables() -> None:
    """Forget every table checked so far (tests and benchmarks)."""
    _checked.clear()


def _remembered(key: Tuple[int, int], spatial_shapes: Tensor,
                level_start_index: Tensor, num_keys: int) -> bool:
    entry = _checked.get(key)
    if entry is None:
        return False
    shapes_ref, starts_ref, versions, checked_keys = entry
    return (shapes_ref() is spatial_shapes
            and starts_ref() is level_start_index
            and versions == _versions(spatial_shapes, level_start_index)
            and checked_keys == num_keys)


def _remember(key: Tuple[int, int], spatial_shapes: Tensor,
              level_start_index: Tensor, num_keys: int) -> None:
    if len(_checked) >= _MAX_REMEMBERED:
        del _checked[next(iter(_checked))]  # the oldest entry
    _checked[key] = (weakref.ref(spatial_shapes),
                     weakref.ref(level_start_index),
                     _versions(spatial_shapes, level_start_index), num_keys)


def _versions(*tensors: Tensor) -> Tuple[int, ...]:
    """Version counters: they grow with every in-place change."""
    return tuple(tensor._version for tensor in tensors)


def _check_on_device(spatial_shapes: Tensor, level_start_index: Tensor,
                     num_keys: int) -> None:
    """The host check's conditions as one device-side assertion (no sync).
    """
    shapes = spatial_shapes.to(torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    expected_starts = sizes.cumsum(0) - sizes
    valid = ((shapes >= 0).all() & (sizes.sum() == num_keys)
             & (level_start_index.to(torch.int64) == expected_starts).all())
    torch._assert_async(
        valid, 'ms_deform_attn: spatial_shapes and level_start_index do not '
        f'tile the {num_keys} keys of value (checked on the device; check '
        'them on the CPU for the details)')


def _check_on_host(spatial_shapes: Tensor, level_start_index: Tensor,
                   num_keys: int) -> None:
    """Read the table and raise with the details of any disagreement."""
    shapes: List[Tuple[int, int]] = [(int(h), int(w))
                                     for h, w in spatial_shapes.tolist()]
    if any(h < 0 or w < 0 for h, w in shapes):
        raise ValueError('ms_deform_attn: spatial_shapes must hold sizes '
                         f'>= 0, got {shapes}')
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != num_keys:
        raise ValueError(
            'ms_deform_attn: spatial_shapes must tile the keys of value: sum '
            f'of h * w over {shapes} is {sum(sizes)} but value has '
            f'num_keys = {num_keys}')
    expected_starts = [sum(sizes[:level]) for level in range(len(sizes))]
    starts = [int(start) for start in level_start_index.tolist()]
    if starts != expected_starts:
        raise ValueError(
            'ms_deform_attn: level_start_index must be the offsets of the '
            f'levels {shapes}, i.e. {expected_starts}, got {starts}')
