"""``python -m ddetr_plugin.ops.check`` on the CPU.

The same command checks a GPU build with ``--device cuda``; here it runs
its small cases on the CPU kernels and must fail when they are wrong.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from ddetr_plugin.ops import check
from testkit import needs_extension

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL_CASES = ['--cases', 'small', 'odd', 'borders']


def run_check(argv):
    lines = []
    status = check.main(argv, report=lines.append)
    return status, lines


@needs_extension
def test_small_cases_pass_on_cpu():
    status, lines = run_check(['--device', 'cpu', *SMALL_CASES])
    assert status == 0, '\n'.join(lines)
    assert lines[-1] == 'passed: all 9 case/dtype pairs within tolerance'
    assert any('kernels for devices: cpu' in line for line in lines)
    # What _C.build_info() says about this CPU build.
    built = f'built against torch {torch.__version__.split("+")[0]}; CUDA '
    assert any(built + 'kernels: none' in line for line in lines)
    # One line per case, dtype and quantity.
    results = [line for line in lines if line.endswith(' ok')]
    assert len(results) == 3 * 3 * 4


@needs_extension
def test_a_wrong_kernel_fails_the_check(monkeypatch):
    correct = check.ms_deform_attn

    def off_by_a_little(*inputs):
        # Within fp16's rounding, beyond fp32's tolerance.
        return correct(*inputs) * (1 + 1e-3)

    monkeypatch.setattr(check, 'ms_deform_attn', off_by_a_little)
    status, lines = run_check(['--cases', 'small'])
    assert status == 1
    mismatches = [line for line in lines if line.endswith('MISMATCH')]
    # The output and, through autograd, all three gradients are off in
    # fp32; fp16 and bf16 are within their rounding.
    assert all(' fp32 ' in line for line in mismatches)
    assert len(mismatches) == 4
    assert lines[-1] == 'FAILED: 1 of 3 case/dtype pairs mismatch'


@needs_extension
def test_the_reference_never_stands_in(monkeypatch):
    # An extension without a CPU kernel would make the front fall back to
    # the reference; the check must call that a failure.
    monkeypatch.setattr(check, 'kernel_device_types',
                        lambda: frozenset({'meta'}))
    status, lines = run_check(['--cases', 'small'])
    assert status == 1
    assert lines[-1].startswith('FAILED: ddetr_plugin._C has no cpu kernel')


@pytest.mark.skipif(
    torch.cuda.is_available(), reason='checks the message without CUDA')
def test_cuda_mode_says_cuda_is_absent():
    status, lines = run_check(['--device', 'cuda'])
    assert status == 2
    assert lines[-1].startswith('check not run: CUDA is not available')


@needs_extension
def test_runs_as_a_module():
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([
        sys.executable, '-m', 'ddetr_plugin.ops.check', '--cases', 'small',
        '--dtypes', 'fp32', 'bf16'
    ],
                            capture_output=True,
                            text=True,
                            cwd=ROOT,
                            env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'passed: all 2 case/dtype pairs' in result.stdout


def test_samples_near_pixel_edges_are_found():
    # One level of width 8, height 4: x = (pixel + 0.5) / 8.
    spatial_shapes = torch.tensor([[4, 8]])
    pixels_x = [3.0, 3.0 + 1e-6, 3.0 - 1e-5, 3.3, -1.0]
    x = (torch.tensor(pixels_x, dtype=torch.float64) + 0.5) / 8
    y = torch.full_like(x, 0.3)
    locations = torch.stack([x, y], -1).view(1, 5, 1, 1, 1, 2)
    near = check.near_pixel_edges(locations, spatial_shapes).flatten()
    # Exact integers floor alike in float32 and float64: still compared.
    assert near.tolist() == [False, True, True, False, False]
