"""``tools/misc/gpu_check.sh``: its payload and its CPU mode.

The GPU mode needs a GPU; everything it does that needs none runs here:
the payload is built from local stand-ins of the downloads (no network),
verified against its manifest, and the CPU mode runs all its stages (the
two nvcc compile checks skipped: ``make cuda-check`` already compiles the
plugin's CUDA source, and each takes minutes on two cores).
"""
import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ddetr_plugin.ops.extension import extension_error, extension_loaded

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / 'tools' / 'misc' / 'gpu_check'


def load_prepare_payload():
    spec = importlib.util.spec_from_file_location(
        'prepare_payload', HELPERS / 'prepare_payload.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_downloads(folder: Path, prepare_payload) -> None:
    """An mmcv sdist holding the files the payload takes, and two wheels.
    """
    with tarfile.open(folder / prepare_payload.MMCV_SDIST, 'w:gz') as sdist:
        for name in prepare_payload.MMCV_FILES + ['setup.py']:
            data = f'// stand-in for {name}\n'.encode()
            member = tarfile.TarInfo(f'mmcv-2.1.0/{name}')
            member.size = len(data)
            sdist.addfile(member, io.BytesIO(data))
    with zipfile.ZipFile(folder / 'deformops-3.0.1-py3-none-any.whl',
                         'w') as wheel:
        wheel.writestr('deformops/__init__.py', '')
    with zipfile.ZipFile(folder / 'ninja-1.13.2-py3-none-any.whl',
                         'w') as wheel:
        wheel.writestr('ninja-1.13.2.data/scripts/ninja',
                       '#!/bin/sh\necho 1.13.2\n')


@pytest.fixture(name='payload')
def payload_fixture(tmp_path):
    prepare_payload = load_prepare_payload()
    downloads = tmp_path / 'downloads'
    downloads.mkdir()
    fake_downloads(downloads, prepare_payload)
    payload = tmp_path / 'payload'
    assert prepare_payload.main([str(payload), '--downloads',
                                 str(downloads)]) == 0
    return payload


def test_payload_holds_only_the_kernel_sources_and_wheels(payload):
    prepare_payload = load_prepare_payload()
    manifest = json.loads((payload / 'MANIFEST.json').read_text())
    mmcv_files = sorted(name for name in manifest['files']
                        if name.startswith('mmcv/'))
    assert mmcv_files == sorted(f'mmcv/{name}'
                                for name in prepare_payload.MMCV_FILES)
    assert (payload / 'mmcv' / 'LICENSE').is_file()
    assert not (payload / 'mmcv' / 'setup.py').exists()
    assert prepare_payload.verify(str(payload)) == []
    # A changed file and a stray one are both reported.
    kernel = payload / 'mmcv' / prepare_payload.MMCV_FILES[-1]
    kernel.write_text('changed\n')
    (payload / 'wheels' / 'extra.txt').write_text('stray\n')
    problems = prepare_payload.verify(str(payload))
    assert any('differs from its manifest' in line for line in problems)
    assert any('extra.txt is not in the manifest' in line for line in problems)


@pytest.mark.skipif(
    not extension_loaded(),
    reason=f'ddetr_plugin._C did not load: {extension_error()}')
def test_cpu_mode_runs_every_stage(payload, tmp_path):
    out = tmp_path / 'out'
    environment = dict(
        os.environ,
        OUT=str(out),
        GPU_CHECK_PAYLOAD=str(payload),
        GPU_CHECK_SKIP_COMPILE='1',
        PYTHON=sys.executable,
        PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        ['bash', str(ROOT / 'tools' / 'misc' / 'gpu_check.sh'), 'cpu'],
        capture_output=True,
        text=True,
        env=environment,
        cwd=tmp_path,
        timeout=600)
    summary = (out / 'summary.txt').read_text()
    assert result.returncode == 0, result.stdout + result.stderr + summary
    stages = [line.split()[0] for line in summary.splitlines()]
    assert stages == [
        'environment', 'payload', 'wheels', 'tests', 'check', 'benchmark',
        'total:'
    ]
    assert summary.count(' ok ') == 6
    assert 'passed: all 1 case/dtype pairs' in (out / 'check.log').read_text()
    # Missing baselines are reported as missing, never timed in their
    # place.
    rows = json.loads((out / 'benchmark.json').read_text())
    implementations = {row['implementation'] for row in rows}
    assert implementations == {
        'ddetr_plugin', 'mmcv-cuda', 'deformops-triton', 'deformops-eager'
    }
    for row in rows:
        if row['implementation'] == 'ddetr_plugin':
            assert row['missing'] is None and row['ms'] > 0
        else:
            assert row['missing'] and 'ms' not in row
