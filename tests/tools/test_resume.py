"""Killed runs resume from their last complete checkpoint.

Both tests train the tiny config for three epochs of four iterations and
stop the process without warning: once with SIGKILL in the middle of the
second epoch, once in the middle of writing the second checkpoint. Each
time ``last_checkpoint`` must name a complete checkpoint, and ``--resume``
must continue from exactly its epoch, iteration, weights, optimizer and
scheduler states, and finish the run.
"""
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest
import torch

from ddetr_plugin.utils import load_checkpoint_file

pytestmark = pytest.mark.slow

ITERS_PER_EPOCH = 4  # 8 images, batch size 2
MAX_EPOCHS = 3


def _assert_same(actual, expected, where):
    """Recursive equality of nested containers of tensors and numbers."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert torch.equal(actual, expected), where
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _assert_same(actual[key], expected[key], f'{where}.{key}')
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (left, right) in enumerate(zip(actual, expected)):
            _assert_same(left, right, f'{where}[{index}]')
    else:
        assert actual == expected, where


def _last_checkpoint(work_dir):
    with open(osp.join(work_dir, 'last_checkpoint')) as file:
        return file.read().strip()


def _train_command(config, work_dir, *extra):
    return [
        'tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
        'default_hooks.checkpoint.max_keep_ckpts=1', *extra
    ]


def _resume_and_check(helpers, config, work_dir, checkpoint_path):
    """Resume, compare the resumed state with the checkpoint, finish."""
    checkpoint = load_checkpoint_file(checkpoint_path)
    helpers.run_tool(_train_command(config, work_dir, '--resume'))
    resumed = torch.load(
        osp.join(work_dir, 'state_before_train_rank0.pth'), weights_only=False)
    assert resumed['epoch'] == checkpoint['meta']['epoch']
    assert resumed['iter'] == checkpoint['meta']['iter']
    _assert_same(resumed['state_dict'], checkpoint['state_dict'], 'state_dict')
    _assert_same(resumed['optimizer'], checkpoint['optimizer'], 'optimizer')
    _assert_same(resumed['param_schedulers'], checkpoint['param_schedulers'],
                 'param_schedulers')
    # The resumed run finished the schedule and kept only its newest file.
    final = _last_checkpoint(work_dir)
    assert osp.basename(final) == f'epoch_{MAX_EPOCHS}.pth'
    assert load_checkpoint_file(final)['meta']['iter'] == (
        MAX_EPOCHS * ITERS_PER_EPOCH)
    assert not osp.exists(checkpoint_path)  # max_keep_ckpts=1
    leftovers = [name for name in os.listdir(work_dir) if '.partial-' in name]
    assert leftovers == []


def test_sigkill_mid_epoch_then_resume(helpers, toy_data, tmp_path):
    work_dir = str(tmp_path / 'work')
    config = helpers.write_tiny_config(
        str(tmp_path), toy_data, max_epochs=MAX_EPOCHS, val_interval=10)
    pause_at = ITERS_PER_EPOCH + 2  # inside epoch 2, after epoch_1.pth
    process = subprocess.Popen(
        [sys.executable] + _train_command(config, work_dir),
        cwd=helpers.repo,
        env=helpers.tool_environment(dict(PAUSE_AT_ITER=str(pause_at))),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 240
        while not osp.exists(osp.join(work_dir, 'paused')):
            if process.poll() is not None:
                pytest.fail('training ended before the pause:\n' +
                            process.stdout.read()[-6000:])
            if time.monotonic() > deadline:
                pytest.fail('training did not reach the pause in 240 s')
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL

    checkpoint_path = _last_checkpoint(work_dir)
    assert osp.basename(checkpoint_path) == 'epoch_1.pth'
    assert load_checkpoint_file(checkpoint_path)['meta']['iter'] == (
        ITERS_PER_EPOCH)
    _resume_and_check(helpers, config, work_dir, checkpoint_path)


def test_interrupted_checkpoint_write_is_never_used(helpers, toy_data,
                                                    tmp_path):
    work_dir = str(tmp_path / 'work')
    config = helpers.write_tiny_config(
        str(tmp_path), toy_data, max_epochs=MAX_EPOCHS, val_interval=10)
    result = helpers.run_tool(
        _train_command(config, work_dir),
        check=False,
        env=dict(INTERRUPT_SAVE_AT_EPOCH='2'))
    assert result.returncode == 3, result.stdout[-6000:]

    # The half-written file exists only under its temporary name...
    partial = [name for name in os.listdir(work_dir) if '.partial-' in name]
    assert len(partial) == 1 and partial[0].startswith('.epoch_2.pth')
    assert not osp.exists(osp.join(work_dir, 'epoch_2.pth'))
    # ...and the previous checkpoint was neither deleted nor replaced in
    # last_checkpoint, although max_keep_ckpts=1 makes it outdated.
    checkpoint_path = _last_checkpoint(work_dir)
    assert osp.basename(checkpoint_path) == 'epoch_1.pth'
    assert load_checkpoint_file(checkpoint_path)['meta']['epoch'] == 1
    _resume_and_check(helpers, config, work_dir, checkpoint_path)
