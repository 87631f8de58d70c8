"""Writing files so that a reader sees either the old file or the new one.

A training run can die at any instant (out of memory, a pre-empted job,
SIGKILL). Writing a checkpoint in place means a kill in the middle leaves a
truncated file under the final name, and ``--resume`` then fails on it, or a
``last_checkpoint`` pointing at it. Everything here writes to a temporary
file in the destination's folder (a rename is only atomic within one file
system), flushes it to the disk, and then renames it over the destination
with ``os.replace``, which POSIX and Windows both perform atomically.
"""
import glob
import os
import os.path as osp
from typing import List

# Temporary files are hidden and carry this marker so that a later run can
# recognise and delete the leftovers of a killed one.
TEMPORARY_MARKER = '.partial-'


def temporary_path(path: str) -> str:
    """A process-unique temporary name next to ``path``."""
    folder, name = osp.split(path)
    return osp.join(folder, f'.{name}{TEMPORARY_MARKER}{os.getpid()}')


def _fsync_folder(folder: str) -> None:
    """Persist a rename: the folder's entry is what a crash could lose."""
    try:
        descriptor = os.open(folder or '.', os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. folders cannot be opened
        return
    try:
        os.fsync(descriptor)
    except OSError:  # pragma: no cover - some file systems refuse
        pass
    finally:
        os.close(descriptor)


def commit(temporary: str, path: str) -> None:
    """Flush ``temporary`` to the disk and atomically rename it to ``path``.

    Args:
        temporary (str): A complete file in the same folder as ``path``.
        path (str): Final name; replaced if it exists.
    """
    with open(temporary, 'rb+') as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_folder(osp.dirname(path))


def atomic_write_bytes(path: str, content: bytes) -> None:
    """Write ``content`` to ``path`` all at once or not at all."""
    temporary = temporary_path(path)
    try:
        with open(temporary, 'wb') as file:
            file.write(content)
        commit(temporary, path)
    finally:
        if osp.exists(temporary):
            os.remove(temporary)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` all at once or not at all."""
    atomic_write_bytes(path, text.encode('utf-8'))


def remove_leftovers(folder: str) -> List[str]:
    """Delete temporary files that killed writers left in ``folder``.

    Only call this while no other process writes into ``folder``.

    Returns:
        list[str]: The deleted paths.
    """
    pattern = osp.join(glob.escape(folder), f'.*{TEMPORARY_MARKER}*')
    removed = []
    for path in glob.glob(pattern):
        if osp.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed
