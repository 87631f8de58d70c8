"""Switching mmcv's ``MultiScaleDeformableAttention`` to the plugin's op.

Every model of MMDetection 3.3.0 with multi-scale deformable attention
(Deformable DETR, DINO, DDQ-DETR, Grounding DINO, Mask2Former's pixel
decoder) builds mmcv's class itself, imported by name, and none of them
calls the sampling functions directly: the only place the sampling is
reached is the forward of mmcv's class, which looks up two names in its
module's globals at every call (``core.py``). Replacing those two module
attributes therefore switches every instance in the process, built before
or after, and leaves the class, its layers and its weights as they are.

``enable`` first checks that mmcv's module is the one this was written
for (mmcv 2.1.0): both names exist with the arguments the stand-ins take,
and the forward reads them from the module. Anything else is refused with
the mmcv version, rather than patched blindly.
"""
import contextlib
import inspect
import warnings
from typing import Dict, Iterator, List

import mmcv
import torch
from mmcv.ops import multi_scale_deform_attn as mmcv_module
from mmengine.logging import print_log

from ..ops.extension import (extension_error, extension_loaded,
                             kernel_device_types)
from .core import PluginSamplingFunction, plugin_sampling_without_start_index

_CPU_NAME = 'multi_scale_deformable_attn_pytorch'
_CUDA_NAME = 'MultiScaleDeformableAttnFunction'
_CHECKED_MMCV = '2.1.0'

# The callable each name stands for, and the arguments it must take: the
# stand-ins are called with exactly these.
_EXPECTED_ARGUMENTS = {
    _CPU_NAME: ('value', 'value_spatial_shapes', 'sampling_locations',
                'attention_weights'),
    _CUDA_NAME:
    ('ctx', 'value', 'value_spatial_shapes', 'value_level_start_index',
     'sampling_locations', 'attention_weights', 'im2col_step'),
}
_STAND_INS = {
    _CPU_NAME: plugin_sampling_without_start_index,
    _CUDA_NAME: PluginSamplingFunction,
}

# mmcv's own objects while the switch is on, by name; empty when off.
_originals: Dict[str, object] = {}


def _arguments_of(name: str, target: object) -> tuple:
    """Parameter names of the function ``name`` stands for."""
    function = target.forward if name == _CUDA_NAME else target
    return tuple(inspect.signature(function).parameters)


def mmcv_mismatches() -> List[str]:
    """What in mmcv's module differs from what the switch expects.

    Returns:
        list[str]: one line per difference; empty when the switch fits.
    """
    problems = []
    for name, expected in _EXPECTED_ARGUMENTS.items():
        # While the switch is on, mmcv's own object is the one to check.
        target = _originals.get(name, getattr(mmcv_module, name, None))
        if target is None:
            problems.append(f'{mmcv_module.__name__} has no {name}')
            continue
        try:
            arguments = _arguments_of(name, target)
        except (AttributeError, TypeError, ValueError) as error:
            problems.append(f'{name} has no readable signature ({error})')
            continue
        if arguments != expected:
            problems.append(f'{name} takes {arguments}, expected {expected}')
    forward = getattr(
        getattr(mmcv_module, 'MultiScaleDeformableAttention', None), 'forward',
        None)
    if forward is None:
        problems.append(f'{mmcv_module.__name__} has no '
                        'MultiScaleDeformableAttention.forward')
        return problems
    # deprecated_api_warning wraps the forward with functools.wraps.
    forward = inspect.unwrap(forward)
    code = getattr(forward, '__code__', None)
    if getattr(forward, '__globals__', None) is not vars(mmcv_module):
        problems.append('MultiScaleDeformableAttention.forward is not '
                        f'defined in {mmcv_module.__name__}')
    elif code is None or not {_CPU_NAME, _CUDA_NAME} <= set(code.co_names):
        problems.append('MultiScaleDeformableAttention.forward does not '
                        f'call {_CPU_NAME} and {_CUDA_NAME} by name')
    return problems


def is_enabled() -> bool:
    """Whether mmcv's attention samples with the plugin's op now."""
    return bool(_originals)


def enable() -> None:
    """Make every mmcv ``MultiScaleDeformableAttention`` use the plugin's op.

    Only the sampling core changes; the module's projections, weights and
    arguments stay mmcv's. Calling it again while on does nothing.

    Raises:
        RuntimeError: mmcv's module is not what the switch was written for
            (the message names the installed mmcv version and each
            difference).
    """
    if is_enabled():
        return
    problems = mmcv_mismatches()
    if problems:
        raise RuntimeError(
            'ddetr_plugin.mmcv_msda cannot switch mmcv '
            f'{mmcv.__version__}\'s MultiScaleDeformableAttention to the '
            f'plugin\'s op (written for mmcv {_CHECKED_MMCV}): ' +
            '; '.join(problems) + '. Remove ddetr_plugin.mmcv_msda from '
            'custom_imports to keep mmcv\'s own op, or install mmcv '
            f'{_CHECKED_MMCV}.')
    for name, stand_in in _STAND_INS.items():
        _originals[name] = getattr(mmcv_module, name)
        setattr(mmcv_module, name, stand_in)
    print_log(
        'ddetr_plugin.mmcv_msda: mmcv\'s MultiScaleDeformableAttention '
        f'now samples with ddetr_plugin\'s op ({_kernels_line()}); its '
        'layers and weights are unchanged',
        logger='current')
    _warn_without_cuda_kernels()


def disable() -> None:
    """Give mmcv its own sampling functions back (nothing if off)."""
    for name, original in _originals.items():
        setattr(mmcv_module, name, original)
    _originals.clear()


@contextlib.contextmanager
def enabled() -> Iterator[None]:
    """The switch on inside the block, as it was before after it."""
    was_enabled = is_enabled()
    enable()
    try:
        yield
    finally:
        if not was_enabled:
            disable()


def _warn_without_cuda_kernels() -> None:
    """Say so where CUDA tensors would lose mmcv's CUDA kernel for the
    plugin's plain-PyTorch reference (a build without CUDA kernels)."""
    if 'cuda' in kernel_device_types() or not torch.cuda.is_available():
        return
    warnings.warn(
        'ddetr_plugin.mmcv_msda: this build of ddetr_plugin has no CUDA '
        'kernels, so mmcv\'s attention on CUDA tensors now runs the '
        'plugin\'s plain-PyTorch reference, slower than mmcv\'s CUDA '
        'kernel. Rebuild the plugin with CUDA (`python -m '
        'ddetr_plugin.ops.check --device cuda` says how it was built) or '
        'remove ddetr_plugin.mmcv_msda from custom_imports.',
        stacklevel=3)


def _kernels_line() -> str:
    """Which compiled kernels serve the op, for the log line."""
    if not extension_loaded():
        return (f'compiled kernels missing ({extension_error()}): the '
                'plain-PyTorch reference serves it')
    devices = sorted(kernel_device_types() - {'meta'})
    return 'compiled kernels for ' + ', '.join(devices)
