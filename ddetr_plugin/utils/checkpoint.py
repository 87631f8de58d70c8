"""Loading MMEngine checkpoints under PyTorch's weights-only unpickler.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True``, and
MMEngine 0.10.7 calls it without the argument, so its own checkpoints (which
hold a ``HistoryBuffer`` message hub, numpy arrays and numpy scalars) no
longer load. Turning weights-only loading off would let any checkpoint run
arbitrary code, so instead the few types an MMEngine checkpoint holds are
allow-listed. A file holding anything else is refused, with a message that
says how to load a file one trusts deliberately:

* ``ddetr_plugin.utils.trust_checkpoint(path)`` in Python, or
* the environment variable ``DDETR_PLUGIN_TRUSTED_CHECKPOINTS``, a
  ``os.pathsep``-separated list of checkpoint paths.

Only the named files are then unpickled in full.
"""
import os
import os.path as osp
import pickle
import struct
import zipfile
from typing import Callable, List, Optional, Set

import numpy as np
import torch

TRUSTED_ENV = 'DDETR_PLUGIN_TRUSTED_CHECKPOINTS'
_trusted_paths: Set[str] = set()
_enabled = False


def _numpy_types() -> List[type]:
    """Numpy objects that pickles of arrays and scalars refer to."""
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [type(np.dtype(t)) for t in np.sctypeDict.values()]
    return [_reconstruct, scalar, np.ndarray, np.dtype] + sorted(
        set(dtype_classes), key=lambda cls: cls.__name__)


# HistoryBuffer's built-in statistics; custom ones registered through
# ``HistoryBuffer.register_statistics`` are added at load time.
_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_getattr(owner: type, name: str) -> Callable:
    """Stand-in for ``builtins.getattr`` inside a weights-only load.

    ``HistoryBuffer.__getstate__`` stores its statistics methods, and pickle
    protocol 2 writes each as ``getattr(HistoryBuffer, 'min')``. Allowing the
    real ``getattr`` would let a file reach any attribute of any allowed
    object, so only these look-ups are served.
    """
    from mmengine.logging import HistoryBuffer
    allowed = set(_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if owner is not HistoryBuffer or name not in allowed:
        raise pickle.UnpicklingError(
            'weights-only checkpoint load: getattr is only allowed for '
            f'HistoryBuffer statistics {sorted(allowed)}, got getattr('
            f'{getattr(owner, "__name__", type(owner).__name__)}, {name!r})')
    return getattr(owner, name)


def checkpoint_safe_globals() -> List[object]:
    """Every non-tensor global an MMEngine checkpoint of this project
    refers to."""
    from mmengine.logging import HistoryBuffer
    return [HistoryBuffer,
            (_history_buffer_getattr, 'builtins.getattr')] + _numpy_types()


def trust_checkpoint(path: str) -> None:
    """Allow one checkpoint file to be unpickled in full.

    Only do this for files you produced or otherwise trust: a pickle can run
    arbitrary code when loaded.

    Args:
        path (str): Path of the checkpoint file.
    """
    _trusted_paths.add(osp.realpath(path))


def is_trusted(path: str) -> bool:
    """Whether ``path`` was marked trusted by code or by the environment."""
    from_env = {
        osp.realpath(p)
        for p in os.environ.get(TRUSTED_ENV, '').split(os.pathsep) if p
    }
    return osp.realpath(path) in _trusted_paths | from_env


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds objects outside the weights-only allow-list."""


class NotACheckpointError(ValueError):
    """A file given as a checkpoint is not one written by ``torch.save``."""


# torch.save writes a zip archive; before PyTorch 1.6 (and with
# _use_new_zipfile_serialization=False) a pickle, which starts with the
# PROTO opcode.
_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTO = b'\x80'
# What some common non-checkpoint files start with, to say what came.
_KNOWN_SIGNATURES = ((b'\x89PNG', 'a PNG image'),
                     (b'\xff\xd8\xff', 'a JPEG image'), (b'{', 'JSON or text'),
                     (b'<', 'HTML or XML'), (b'\x1f\x8b', 'a gzip archive'))


def _describe(head: bytes) -> str:
    for signature, kind in _KNOWN_SIGNATURES:
        if head.startswith(signature):
            return kind
    try:
        head.decode('utf-8')
    except UnicodeDecodeError:
        return f'data starting with {head[:8]!r}'
    return 'text' if head else 'an empty file'


def _not_a_checkpoint(filename: str, what: str) -> NotACheckpointError:
    return NotACheckpointError(
        f'{filename!r} is not a PyTorch checkpoint: {what}. Give the .pth '
        'file written by training (e.g. WORK_DIR/epoch_12.pth), and '
        'download or copy it again if it may be incomplete.')


def check_checkpoint_format(filename: str) -> None:
    """Raise unless ``filename`` looks like a ``torch.save`` file.

    Args:
        filename (str): A local file.

    Raises:
        NotACheckpointError: Naming the file and what it holds instead (an
            image, text, a truncated archive...).
    """
    with open(filename, 'rb') as file:
        head = file.read(64)
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(filename):
            raise _not_a_checkpoint(
                filename, 'a zip archive without its end (truncated?)')
        with zipfile.ZipFile(filename) as archive:
            names = archive.namelist()
        if not any(name.endswith('data.pkl') for name in names):
            raise _not_a_checkpoint(
                filename, 'a zip archive without the data.pkl that '
                'torch.save writes')
        return
    if not head.startswith(_PICKLE_PROTO):
        raise _not_a_checkpoint(filename, _describe(head))


def _is_foreign_object_error(error: Exception) -> bool:
    """Whether a weights-only load failed on an object outside the
    allow-list (rather than on a damaged file)."""
    return 'global' in str(error).lower()


def load_checkpoint_file(filename: str,
                         map_location: Optional[object] = None) -> dict:
    """``torch.load`` a local checkpoint, weights-only unless trusted.

    Args:
        filename (str): Path of the checkpoint.
        map_location: Passed to ``torch.load``.

    Returns:
        dict: The loaded checkpoint.

    Raises:
        FileNotFoundError: If ``filename`` does not exist.
        NotACheckpointError: If the file is not a ``torch.save`` file (an
            image, text) or is damaged (truncated).
        UntrustedCheckpointError: If the file holds types outside the
            allow-list and was not marked trusted.
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'checkpoint file {filename!r} does not '
                                'exist')
    check_checkpoint_format(filename)
    try:
        if is_trusted(filename):
            return torch.load(
                filename, map_location=map_location, weights_only=False)
        return torch.load(
            filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if not _is_foreign_object_error(error):
            raise _not_a_checkpoint(
                filename, 'it cannot be unpickled (damaged or truncated?): '
                f'{str(error).splitlines()[0]}') from error
        raise UntrustedCheckpointError(
            f'{filename!r} holds objects that are not allowed in a weights-'
            'only load (MMEngine checkpoints need only tensors, numpy '
            'arrays and scalars, and HistoryBuffer). PyTorch said: '
            f'{str(error).splitlines()[0]} If you trust this file, load it '
            'deliberately with ddetr_plugin.utils.trust_checkpoint(path) or '
            f'by listing it in the environment variable {TRUSTED_ENV}; a '
            'pickle can run arbitrary code.') from error
    except (EOFError, IndexError, KeyError, RuntimeError, ValueError,
            struct.error) as error:
        # A truncated or garbled pickle ends early, reads past its end or
        # meets an unknown opcode; a damaged archive fails in PyTorch's zip
        # reader.
        raise _not_a_checkpoint(
            filename, f'it cannot be read (damaged or truncated?): '
            f'{type(error).__name__}: {str(error).splitlines()[0]}') from error


def _mmengine_local_loader(filename: str,
                           map_location: Optional[object] = None) -> dict:
    return load_checkpoint_file(filename, map_location)


def enable_safe_checkpoint_loading() -> None:
    """Allow-list MMEngine's checkpoint types and route its local loads
    through :func:`load_checkpoint_file`. Safe to call more than once."""
    global _enabled
    if _enabled:
        return
    torch.serialization.add_safe_globals(checkpoint_safe_globals())
    from mmengine.runner.checkpoint import CheckpointLoader
    register: Callable = CheckpointLoader.register_scheme(
        prefixes='', force=True)
    register(_mmengine_local_loader)
    _enabled = True
