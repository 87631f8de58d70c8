"""Loading the compiled extension ``ddetr_plugin._C``.

The extension holds the kernels of ``torch.ops.ddetr_plugin`` (a CPU build
everywhere, CUDA kernels where it was built with CUDA). It may be missing
(a checkout that was never built) or fail to load (built against another
torch); neither is an error at import time: the op then falls back to the
plain-PyTorch reference and says so once, when it is first called.

Nothing here initialises CUDA: which devices have kernels is read from the
dispatcher's registrations, not from the devices present.
"""
import importlib
from typing import FrozenSet, Optional

import torch

_OPERATOR = 'ddetr_plugin::ms_deform_attn_forward'

# Dispatch keys the op may have a kernel for, by device type. The meta
# kernel is the fake kernel that ms_deform_attn.py registers.
_DISPATCH_KEYS = {'cpu': 'CPU', 'cuda': 'CUDA', 'meta': 'Meta'}

_loaded = False
_error: Optional[str] = None
_kernel_devices: FrozenSet[str] = frozenset()


def _load() -> None:
    """Import the extension once and record the outcome."""
    global _loaded, _error
    try:
        importlib.import_module('ddetr_plugin._C')
    except Exception as error:  # any failure means: use the reference
        _error = f'{type(error).__name__}: {error}'
        return
    if not hasattr(torch.ops.ddetr_plugin, 'ms_deform_attn_forward'):
        _error = f'ddetr_plugin._C loaded but did not register {_OPERATOR}'
        return
    _loaded = True
    scan_kernel_devices()


def scan_kernel_devices() -> None:
    """Read again which device types have a kernel of the op.

    Called after loading the extension and after registering the fake
    kernels; reading the dispatcher initialises no device.
    """
    global _kernel_devices
    if not _loaded:
        return
    _kernel_devices = frozenset(
        device for device, key in _DISPATCH_KEYS.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(_OPERATOR, key))


def extension_loaded() -> bool:
    """Whether ``ddetr_plugin._C`` loaded and registered the op."""
    return _loaded


def extension_error() -> Optional[str]:
    """Why the extension did not load, or None when it did."""
    return _error


def kernel_device_types() -> FrozenSet[str]:
    """Device types (``'cpu'``, ``'cuda'``, ``'meta'``) with a kernel."""
    return _kernel_devices


_load()
