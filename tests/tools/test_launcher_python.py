"""The launch scripts find the checkout's Python without an activated venv.

The README runs ``bash tools/dist_train.sh CONFIG 2`` as written; the
scripts must then use ``.venv/bin/python`` of the checkout they belong to,
unless ``PYTHON`` names another interpreter, and fall back to ``python``
from ``PATH`` in a checkout without a virtual environment. Each case runs
the real scripts, copied into a scratch checkout whose interpreters are
stand-ins that record how they were called.
"""
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(
    shutil.which('bash') is None, reason='the launchers are bash scripts')

LAUNCHERS = ('dist_train.sh', 'dist_test.sh', 'slurm_train.sh', 'torchrun.sh',
             'python_path.sh')
# Records its own path and arguments, as the interpreter would be called.
RECORDER = """#!/bin/sh
printf '%s\\n' "$0" "$@" > "$RECORD_FILE"
"""
# srun stand-in: runs the command it was given (one task).
FAKE_SRUN = """#!/bin/sh
while [ "$#" -gt 0 ]; do
    case "$1" in -p) shift 2 ;; -*) shift ;; *) break ;; esac
done
exec "$@"
"""


def _executable(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def checkout(helpers, tmp_path):
    """A scratch checkout holding the real launch scripts."""
    tools = tmp_path / 'checkout' / 'tools'
    tools.mkdir(parents=True)
    for name in LAUNCHERS:
        shutil.copy2(os.path.join(helpers.repo, 'tools', name), tools)
    return tmp_path / 'checkout'


def _run(checkout, tmp_path, script, arguments, python=None, venv=True):
    """Run tools/<script>; return the recorded interpreter call."""
    record = tmp_path / 'record.txt'
    bin_dir = tmp_path / 'bin'
    _executable(bin_dir / 'python', RECORDER)
    _executable(bin_dir / 'srun', FAKE_SRUN)
    if venv:
        _executable(checkout / '.venv' / 'bin' / 'python', RECORDER)
    env = {key: value for key, value in os.environ.items() if key != 'PYTHON'}
    env.update(
        RECORD_FILE=str(record),
        PATH=f'{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin')
    if python is not None:
        env['PYTHON'] = python
    result = subprocess.run(
        ['bash', str(checkout / 'tools' / script)] + arguments,
        cwd=str(tmp_path),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60)
    assert result.returncode == 0, result.stdout
    lines = record.read_text().splitlines()
    return dict(interpreter=lines[0], arguments=lines[1:])


@pytest.mark.parametrize('script,arguments,expected', [
    ('dist_train.sh', ['cfg.py', '2', '--amp'],
     ['-m', 'torch.distributed.run', '--nproc_per_node=2']),
    ('dist_test.sh', ['cfg.py', 'ckpt.pth', '2'],
     ['-m', 'torch.distributed.run', '--nproc_per_node=2']),
    ('slurm_train.sh', ['part', 'job', 'cfg.py', 'work'], ['-u']),
])
def test_checkout_venv_is_used_without_activation(checkout, tmp_path, script,
                                                  arguments, expected):
    call = _run(checkout, tmp_path, script, arguments)
    assert call['interpreter'] == str(checkout / '.venv' / 'bin' / 'python')
    for argument in expected:
        assert argument in call['arguments']
    assert str(
        checkout / 'tools' /
        ('test.py' if 'test' in script else 'train.py')) in call['arguments']
    assert 'cfg.py' in call['arguments']


@pytest.mark.parametrize('script,arguments', [
    ('dist_train.sh', ['cfg.py', '2']),
    ('slurm_train.sh', ['part', 'job', 'cfg.py', 'work']),
])
def test_python_variable_overrides_the_venv(checkout, tmp_path, script,
                                            arguments):
    other = _executable(tmp_path / 'other' / 'python3.11', RECORDER)
    call = _run(checkout, tmp_path, script, arguments, python=other)
    assert call['interpreter'] == other


def test_python_from_path_without_a_venv(checkout, tmp_path):
    call = _run(
        checkout, tmp_path, 'dist_train.sh', ['cfg.py', '2'], venv=False)
    assert call['interpreter'] == str(tmp_path / 'bin' / 'python')
    assert call['arguments'][:2] == ['-m', 'torch.distributed.run']
