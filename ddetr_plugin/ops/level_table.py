"""Checking the level table without stalling the GPU.

The level table is the pair ``spatial_shapes`` (num_levels, 2) and
``level_start_index`` (num_levels,). Whether it tiles the keys of the value
depends on its values. Reading them on the host from a CUDA tensor waits
for every queued kernel (a device-to-host sync): before, that happened at
every call of the op, which blocks CUDA-graph capture and stalls short
decoder calls.

So the check runs:

- on the host where reading is free (CPU tensors);
- on other devices, on the host once per table (the detailed message for
  the usual mistakes), and on the device at every later call, with
  ``torch._assert_async`` (no sync). A table that passed the host check is
  remembered by identity, data pointer and version counter, but that only
  spares the host check: writes the version counter does not see
  (``t.data[...] = x``, DLPack or CuPy writers, any change of an inference
  tensor) would leave a remembered table stale, so the device check runs
  at every call all the same. Deformable DETR builds one table per forward
  for its twelve attention layers: one sync per forward;
- on the device only, where the host may not wait (CUDA-graph capture, or
  ``torch.cuda.set_sync_debug_mode`` set), and for inference tensors
  (built under ``torch.inference_mode()``), which have no version counter
  and are never remembered;
- not at all while tracing (``torch.compile``, ``torch.export``, fake or
  meta tensors), where the values are unknown.

Both checks refuse tables whose sizes overflow int64 (the host check
computes in Python integers, the device check bounds every level by the
keys before multiplying). The compiled kernels also bound every level by
themselves (a level outside the keys reads and writes nothing), so a table
that escaped the checks would give wrong numbers, never memory errors.
"""
import threading
import weakref
from typing import Dict, List, Tuple

import torch
from torch import Tensor

try:  # private, but the only way to recognise fake tensors outside dynamo
    from torch._subclasses.fake_tensor import is_fake
except ImportError:  # pragma: no cover - older or newer torch

    def is_fake(tensor: Tensor) -> bool:
        return False


# Tables that passed the host check, by (id(spatial_shapes),
# id(level_start_index)): weak references to both (an id may be reused once
# a tensor dies), their data pointers (``t.data = other`` swaps the memory
# and keeps the version), version counters and the number of keys they were
# checked against. Attention layers may run in several threads at once
# (DataParallel, multi-threaded serving): every access holds _lock.
_MAX_REMEMBERED = 32
_checked: Dict[Tuple[int, int], tuple] = {}
_lock = threading.Lock()


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
    table = (spatial_shapes, level_start_index)
    if (host_may_wait(spatial_shapes.device) and not is_inference(*table)
            and not _remembered(table, num_keys)):
        _check_on_host(spatial_shapes, level_start_index, num_keys)
        _remember(table, num_keys)
        return
    _check_on_device(spatial_shapes, level_start_index, num_keys)


def is_inference(*tensors: Tensor) -> bool:
    """Whether any of ``tensors`` was made under ``torch.inference_mode``:
    such tensors have no version counter, so no change of them is seen."""
    return any(tensor.is_inference() for tensor in tensors)


def forget_checked_tables() -> None:
    """Forget every table checked so far (tests and benchmarks)."""
    with _lock:
        _checked.clear()


def _table_state(table: Tuple[Tensor, Tensor]) -> Tuple[int, ...]:
    """What changes when a table's memory is swapped or written in place
    (the version counter seeing the write)."""
    pointers = tuple(tensor.data_ptr() for tensor in table)
    return pointers + tuple(tensor._version for tensor in table)


def _remembered(table: Tuple[Tensor, Tensor], num_keys: int) -> bool:
    key = tuple(id(tensor) for tensor in table)
    with _lock:
        entry = _checked.get(key)
    if entry is None:
        return False
    references, state, checked_keys = entry
    return (all(reference() is tensor
                for reference, tensor in zip(references, table))
            and state == _table_state(table) and checked_keys == num_keys)


def _remember(table: Tuple[Tensor, Tensor], num_keys: int) -> None:
    key = tuple(id(tensor) for tensor in table)
    references = tuple(weakref.ref(tensor) for tensor in table)
    entry = (references, _table_state(table), num_keys)
    with _lock:
        if key not in _checked and len(_checked) >= _MAX_REMEMBERED:
            del _checked[next(iter(_checked))]  # the oldest entry
        _checked[key] = entry


def _check_on_device(spatial_shapes: Tensor, level_start_index: Tensor,
                     num_keys: int) -> None:
    """The host check's conditions as one device-side assertion (no sync).

    Every level is first bounded by the keys (``w <= num_keys // h``), so
    no size, sum or start below overflows int64: a wrapped product could
    otherwise pass, e.g. (2**62, 4) is 0 keys in int64.
    """
    shapes = spatial_shapes.to(torch.int64)
    heights, widths = shapes.unbind(1)
    bounded = (shapes >= 0).all(1) & (
        widths <= num_keys // heights.clamp(min=1))
    sizes = heights * widths * bounded
    ends = sizes.cumsum(0)
    valid = (
        bounded.all() & (sizes.sum() == num_keys)
        & (level_start_index.to(torch.int64) == ends - sizes).all())
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
