"""Behaviour of ``tools/misc/cuda_compile_check.py``.

The checks that run nvcc use tiny sources (a second or two each) and skip
where nvcc is missing; the full check of the real sources is ``make
cuda-check``, too slow for the test suite.
"""
import os.path as osp
import shutil

import pytest

from testkit import load_script, repo_path

TOOL = repo_path('tools', 'misc', 'cuda_compile_check.py')


@pytest.fixture(name='tool')
def tool_fixture():
    return load_script(TOOL, 'cuda_compile_check')


@pytest.fixture(name='no_nvcc')
def no_nvcc_fixture(monkeypatch, tmp_path):
    monkeypatch.setenv('PATH', str(tmp_path))
    monkeypatch.delenv('CUDA_HOME', raising=False)
    monkeypatch.delenv('CUDA_PATH', raising=False)


needs_nvcc = pytest.mark.skipif(
    shutil.which('nvcc') is None, reason='nvcc not found on PATH')


def write_source(directory, name, text):
    path = directory / name
    path.write_text(text)
    return str(path)


def test_missing_nvcc_skips_outside_ci(tool, no_nvcc, monkeypatch, capsys):
    monkeypatch.delenv('CI', raising=False)
    assert tool.main([]) == 0
    assert 'SKIPPED' in capsys.readouterr().out


def test_missing_nvcc_fails_in_ci(tool, no_nvcc, monkeypatch, capsys):
    monkeypatch.setenv('CI', 'true')
    assert tool.main([]) == 1
    assert 'CI=true requires' in capsys.readouterr().err


def test_missing_source_is_an_error(tool, tmp_path, capsys):
    if tool.find_nvcc() is None:
        pytest.skip('nvcc not found')
    assert tool.main(['--sources', str(tmp_path / 'absent.cu')]) == 1
    assert 'absent.cu' in capsys.readouterr().err


def test_command_targets_every_architecture(tool):
    command = tool.nvcc_command('nvcc', 'a.cu', 'a.o', ['-I/torch'],
                                ['-DWITH_CUDA'], ['80', '90'], 2)
    assert command[:5] == ['nvcc', '-c', 'a.cu', '-o', 'a.o']
    assert '-std=c++17' in command
    for arch in ('80', '90'):
        assert f'arch=compute_{arch},code=sm_{arch}' in command
    assert '-DWITH_CUDA' in command and '-I/torch' in command


def test_torch_flags_match_the_extension_build(tool):
    includes, flags = tool.torch_flags()
    assert any(
        flag.endswith(osp.join('torch', 'include')) for flag in includes)
    assert '-DTORCH_EXTENSION_NAME=_C' in flags
    assert any(flag.startswith('-D_GLIBCXX_USE_CXX11_ABI=') for flag in flags)
    # torch compiles extensions without the implicit half conversions.
    assert '-D__CUDA_NO_HALF_CONVERSIONS__' in flags


@needs_nvcc
def test_valid_source_passes_with_stand_in_header(tool, tmp_path, capsys):
    # Compiles only if the stand-in header is on the include path.
    source = write_source(
        tmp_path, 'valid.cu', '#include <c10/cuda/impl/cuda_cmake_macros.h>\n'
        '#ifndef C10_CUDA_BUILD_SHARED_LIBS\n'
        '#error "stand-in header not used"\n'
        '#endif\n'
        '__global__ void add_one(float* data) { data[threadIdx.x] += 1; }\n')
    assert tool.main(['--sources', source, '--nvcc-threads', '1']) == 0
    assert 'all 1 file(s) compiled' in capsys.readouterr().out


@needs_nvcc
def test_broken_source_fails_and_shows_the_error(tool, tmp_path, capsys):
    source = write_source(tmp_path, 'broken.cu',
                          '__global__ void broken() { undeclared_name; }\n')
    assert tool.main(['--sources', source, '--archs', '80']) == 1
    output = capsys.readouterr().out
    assert 'FAILED' in output and 'undeclared_name' in output
