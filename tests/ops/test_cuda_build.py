"""The decision to build the CUDA kernels, and the fallback's explanation.

torch, its ``CUDA_HOME`` and nvcc are replaced by stand-ins, so every case
runs on a CPU-only machine: a CPU torch, no toolkit, a toolkit of another
major CUDA version than torch's, no GPU, and a buildable set-up.
"""
import importlib

import pytest
import torch
from torch.utils import cpp_extension

from ddetr_plugin.ops import cuda_build

front = importlib.import_module('ddetr_plugin.ops.ms_deform_attn')


@pytest.fixture(name='toolkit')
def toolkit_fixture(tmp_path, monkeypatch):
    """Make torch a CUDA build whose CUDA_HOME holds a stand-in nvcc.

    Returns a function (nvcc release, torch's CUDA version, GPU visible)
    -> the toolkit folder.
    """

    def install(release, torch_cuda='12.4', gpu=True):
        nvcc = tmp_path / 'bin' / 'nvcc'
        nvcc.parent.mkdir(exist_ok=True)
        nvcc.write_text('#!/bin/sh\n'
                        'echo "nvcc: NVIDIA (R) Cuda compiler driver"\n'
                        f'echo "Cuda compilation tools, release {release}, '
                        f'V{release}.1"\n')
        nvcc.chmod(0o755)
        monkeypatch.setattr(torch.version, 'cuda', torch_cuda)
        monkeypatch.setattr(cpp_extension, 'CUDA_HOME', str(tmp_path))
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpu)
        return str(tmp_path)

    return install


def test_matching_toolkit_builds_cuda(toolkit):
    home = toolkit('12.6', torch_cuda='12.4')
    plan = cuda_build.plan_cuda_build(environ={})
    assert plan.build_cuda
    assert 'nvcc 12.6' in plan.reason and home in plan.reason


def test_other_major_version_builds_without_cuda_and_says_why(toolkit):
    home = toolkit('13.0', torch_cuda='12.4')
    plan = cuda_build.plan_cuda_build(environ={})
    assert not plan.build_cuda
    for expected in ('nvcc 13.0', home, 'CUDA 12.4', 'CUDA 12.x toolkit',
                     'CUDA_HOME'):
        assert expected in plan.reason


def test_force_cuda_turns_the_reason_into_an_error(toolkit):
    toolkit('13.0', torch_cuda='12.4')
    with pytest.raises(RuntimeError, match='FORCE_CUDA=1.*nvcc 13.0'):
        cuda_build.plan_cuda_build(environ={'FORCE_CUDA': '1'})


def test_without_gpu_needs_an_architecture_list(toolkit):
    toolkit('12.4', gpu=False)
    plan = cuda_build.plan_cuda_build(environ={})
    assert not plan.build_cuda and 'TORCH_CUDA_ARCH_LIST' in plan.reason
    plan = cuda_build.plan_cuda_build(
        environ={'TORCH_CUDA_ARCH_LIST': '8.0;9.0'})
    assert plan.build_cuda


def test_missing_toolkit_and_cpu_torch(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '12.4')
    monkeypatch.setattr(cpp_extension, 'CUDA_HOME', None)
    plan = cuda_build.plan_cuda_build(environ={})
    assert not plan.build_cuda and 'set CUDA_HOME' in plan.reason
    monkeypatch.setattr(torch.version, 'cuda', None)
    plan = cuda_build.plan_cuda_build(environ={})
    assert not plan.build_cuda and 'CPU build' in plan.reason


def test_broken_nvcc_is_named(toolkit, tmp_path):
    toolkit('12.4')
    (tmp_path / 'bin' / 'nvcc').write_text('#!/bin/sh\nexit 1\n')
    plan = cuda_build.plan_cuda_build(environ={})
    assert not plan.build_cuda and 'nvcc did not run' in plan.reason


def test_cuda_fallback_warning_explains_the_build(toolkit, monkeypatch):
    # CUDA tensors reaching a build with CPU kernels only: the warning says
    # why the build left CUDA out, and what to change.
    if not front.extension_loaded():
        pytest.skip('ddetr_plugin._C did not load')
    monkeypatch.setattr(front, 'kernel_device_types',
                        lambda: frozenset({'cpu', 'meta'}))
    toolkit('13.0', torch_cuda='12.4')
    reason = front._fallback_reason('cuda')
    assert 'no kernel for cuda tensors' in reason
    assert 'built without them' in reason and 'nvcc 13.0' in reason
    toolkit('12.4', torch_cuda='12.4')
    assert 'a build now would have them' in front._fallback_reason('cuda')
