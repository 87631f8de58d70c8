"""``tools/misc/gpu_check.sh``: its payload, its CPU mode and its verdicts.

The GPU mode needs a GPU; everything it does that needs none runs here:
the payload is built from local stand-ins of the downloads (no network),
verified against its manifest, and the CPU mode runs all its stages (the
two nvcc compile checks skipped: ``make cuda-check`` already compiles the
plugin's CUDA source, and each takes minutes on two cores). The verdicts
that decide whether a stage did its job (tests that all skipped, benchmark
rows of the fallback, a missing payload, missing toolkit headers) are
checked on made-up outputs.
"""
import importlib
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

from testkit import load_script, needs_extension

ROOT = Path(__file__).resolve().parents[2]
HELPERS = ROOT / 'tools' / 'misc' / 'gpu_check'


def load_prepare_payload():
    return load_helper('prepare_payload')


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


@needs_extension
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
    verdicts = {
        line.split()[0]: line.split()[1]
        for line in summary.splitlines()
        if not line.startswith(('total:', 'gpu_check:'))
    }
    # The CUDA tests cannot run here: SKIPPED with the reason, not ok.
    assert verdicts == {
        'environment': 'ok',
        'payload': 'ok',
        'wheels': 'ok',
        'tests': 'SKIPPED',
        'check': 'ok',
        'benchmark': 'ok',
    }
    tests_line = next(line for line in summary.splitlines()
                      if line.startswith('tests'))
    assert 'did not run the CUDA kernels: no CUDA device' in tests_line
    assert 'gpu_check: 5 ok, 1 SKIPPED, 0 FAILED or TIMEOUT' in summary
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
            assert row['fallback'] is False
        else:
            assert row['missing'] and 'ms' not in row


def load_helper(name: str):
    return load_script(str(HELPERS / f'{name}.py'))


def junit_xml(path: Path, cases) -> str:
    """A JUnit XML file of ``cases``: (name, outcome, skip message)."""
    lines = ['<testsuites><testsuite name="pytest">']
    for name, outcome, message in cases:
        body = {
            'passed': '',
            'skipped': f'<skipped message="{message}"/>',
            'failed': '<failure message="assert False"/>',
        }[outcome]
        lines.append(f'<testcase name="{name}">{body}</testcase>')
    lines.append('</testsuite></testsuites>')
    path.write_text('\n'.join(lines))
    return str(path)


NO_DEVICE = 'no CUDA device (torch.cuda.is_available() is False)'
NO_KERNEL = 'ddetr_plugin._C has no CUDA kernel (built without CUDA)'


@pytest.mark.parametrize(
    'cases, mode, status, verdict',
    [
        # After a failed build every CUDA test skips and pytest exits 0.
        ([('a', 'skipped', NO_KERNEL),
          ('b', 'passed', '')], 'gpu', 0, 'FAILED'),
        ([('a', 'skipped', NO_DEVICE),
          ('b', 'passed', '')], 'cpu', 0, 'SKIPPED'),
        ([('a', 'passed', ''),
          ('b', 'skipped', 'needs two CUDA devices')], 'gpu', 0, 'ok'),
        ([('a', 'passed', ''), ('b', 'failed', '')], 'gpu', 1, 'FAILED'),
        ([], 'gpu', 5, 'FAILED'),
    ],
    ids=['kernel-skipped', 'cpu-machine', 'passed', 'failed', 'none'])
def test_tests_stage_is_ok_only_if_the_cuda_tests_ran(tmp_path, cases, mode,
                                                      status, verdict):
    stage_verdict = load_helper('stage_verdict')
    path = junit_xml(tmp_path / 'tests.xml', cases)
    word, detail = stage_verdict.tests_verdict(path, mode, status)
    assert word == verdict, detail
    if cases and cases[0][2] in (NO_DEVICE, NO_KERNEL):
        assert cases[0][2] in detail  # the reason, in the summary line
    missing = str(tmp_path / 'absent.xml')
    assert stage_verdict.tests_verdict(missing, mode, 0)[0] == 'FAILED'


def benchmark_rows(path: Path, fallback: bool, failed: bool = False) -> str:
    plugin = dict(implementation='ddetr_plugin', fallback=fallback)
    plugin.update(missing='failed: RuntimeError' if failed else None)
    if not failed:
        plugin['ms'] = 1.0
    baseline = dict(implementation='mmcv-cuda', missing='not built')
    path.write_text(json.dumps([plugin, baseline]))
    return str(path)


def test_benchmark_stage_fails_on_fallback_rows(tmp_path):
    stage_verdict = load_helper('stage_verdict')
    compiled = benchmark_rows(tmp_path / 'compiled.json', fallback=False)
    assert stage_verdict.benchmark_verdict(compiled)[0] == 'ok'
    fallback = benchmark_rows(tmp_path / 'fallback.json', fallback=True)
    word, detail = stage_verdict.benchmark_verdict(fallback)
    assert word == 'FAILED' and 'FALLBACK' in detail
    failed = benchmark_rows(
        tmp_path / 'failed.json', fallback=False, failed=True)
    assert stage_verdict.benchmark_verdict(failed)[0] == 'FAILED'
    assert stage_verdict.main(['benchmark', fallback]) == 1


def test_benchmark_rows_say_fallback(tmp_path, monkeypatch, capsys):
    # No compiled kernel for the device: the op runs the reference, and
    # every plugin row says so (not only the header).
    from ddetr_plugin.ops import extension
    front = importlib.import_module('ddetr_plugin.ops.ms_deform_attn')
    monkeypatch.setattr(extension, 'kernel_device_types', frozenset)
    monkeypatch.setattr(front, 'kernel_device_types', frozenset)
    benchmark = load_script('tools/analysis_tools/benchmark_msda.py')
    rows_path = tmp_path / 'rows.json'
    monkeypatch.setattr(sys, 'argv', [
        'benchmark_msda.py', '--shapes', 'decoder-bs1', '--repeat', '1',
        '--warmup', '0', '--threads', '1', '--baselines', 'mmcv-cuda',
        '--json',
        str(rows_path)
    ])
    benchmark.main()
    plugin_rows = [
        line for line in capsys.readouterr().out.splitlines()
        if line.startswith('decoder-bs1') and 'ddetr_plugin' in line
    ]
    assert len(plugin_rows) == 2  # forward, forward+backward
    assert all('ddetr_plugin FALLBACK' in line for line in plugin_rows)
    rows = json.loads(rows_path.read_text())
    assert [
        row['fallback'] for row in rows
        if row['implementation'] == 'ddetr_plugin'
    ] == [True, True]


def test_wheels_stage_fails_without_wheels(tmp_path):
    empty = tmp_path / 'wheels'
    empty.mkdir()
    result = subprocess.run([
        sys.executable,
        str(HELPERS / 'unpack_wheels.py'),
        str(empty),
        str(tmp_path / 'site')
    ],
                            capture_output=True,
                            text=True)
    assert result.returncode != 0
    assert 'no wheel in' in result.stderr and 'prepare' in result.stderr


@pytest.mark.parametrize('missing', ['cublasLt.h', 'cusolverDn.h'])
def test_mmcv_build_uses_the_stand_in_without_every_context_header(
        monkeypatch, tmp_path, missing):
    # CUDAContextLight.h includes cuBLASLt's and cuSOLVER's headers too, not
    # only cuSPARSE's and cuBLAS's.
    build = load_helper('build_mmcv_msda')
    toolkit = str(tmp_path / 'include')
    monkeypatch.setattr(build, 'header_dirs', lambda header: []
                        if header == missing else [toolkit])
    includes = build.include_dirs(str(tmp_path / 'payload'))
    assert includes[0] == str(HELPERS / 'shim_context')
    assert toolkit not in includes
