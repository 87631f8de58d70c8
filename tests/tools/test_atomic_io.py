"""Atomic file writes: a reader sees the old file or the new, never half."""
import os
import os.path as osp

import pytest

from ddetr_plugin.engine import atomic_io


def test_write_replaces_the_whole_file(tmp_path):
    path = str(tmp_path / 'last_checkpoint')
    atomic_io.atomic_write_text(path, 'old')
    atomic_io.atomic_write_text(path, 'new')
    with open(path) as file:
        assert file.read() == 'new'
    assert os.listdir(tmp_path) == ['last_checkpoint']


def test_failed_write_keeps_the_old_file_and_no_temporary(
        tmp_path, monkeypatch):
    path = str(tmp_path / 'epoch_1.pth')
    atomic_io.atomic_write_bytes(path, b'complete checkpoint')

    def disk_full(temporary, final):
        raise OSError('No space left on device')

    monkeypatch.setattr(atomic_io, 'commit', disk_full)
    with pytest.raises(OSError, match='No space'):
        atomic_io.atomic_write_bytes(path, b'new')
    with open(path, 'rb') as file:
        assert file.read() == b'complete checkpoint'
    assert os.listdir(tmp_path) == ['epoch_1.pth']


def test_temporary_path_is_hidden_in_the_same_folder(tmp_path):
    path = str(tmp_path / 'epoch_3.pth')
    temporary = atomic_io.temporary_path(path)
    assert osp.dirname(temporary) == str(tmp_path)
    assert osp.basename(temporary).startswith('.epoch_3.pth')
    assert atomic_io.TEMPORARY_MARKER in temporary
    assert str(os.getpid()) in temporary


def test_remove_leftovers_deletes_only_temporaries(tmp_path):
    leftover = tmp_path / f'.epoch_2.pth{atomic_io.TEMPORARY_MARKER}123'
    leftover.write_bytes(b'half')
    keep = [tmp_path / 'epoch_1.pth', tmp_path / '.hidden_config']
    for path in keep:
        path.write_bytes(b'x')
    removed = atomic_io.remove_leftovers(str(tmp_path))
    assert removed == [str(leftover)]
    assert sorted(os.listdir(tmp_path)) == ['.hidden_config', 'epoch_1.pth']
