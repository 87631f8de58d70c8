"""Two-process training through tools/dist_train.sh (torchrun) on a CPU.

Without CUDA the processes must talk over gloo, and data-parallel training
must leave both ranks with the same weights.
"""
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which('bash') is None, reason='dist_train.sh needs bash')
]


def test_two_ranks_train_to_identical_weights(helpers, toy_data, tmp_path):
    work_dir = str(tmp_path / 'work')
    config = helpers.write_tiny_config(
        str(tmp_path), toy_data, max_epochs=1, val_interval=10)
    env = helpers.tool_environment(
        dict(PYTHON=sys.executable, PORT=str(helpers.free_port())))
    result = subprocess.run([
        'bash',
        osp.join(helpers.repo, 'tools', 'dist_train.sh'), config, '2',
        '--work-dir', work_dir
    ],
                            cwd=helpers.repo,
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]

    before = torch.load(
        osp.join(work_dir, 'state_before_train_rank0.pth'),
        weights_only=False)['state_dict']
    ranks = [
        torch.load(
            osp.join(work_dir, f'state_after_train_rank{rank}.pth'),
            weights_only=False) for rank in (0, 1)
    ]
    expected_backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    for state in ranks:
        assert state['world_size'] == 2
        assert state['backend'] == expected_backend
    first, second = ranks[0]['parameters'], ranks[1]['parameters']
    assert set(first) == set(second) and len(first) > 0
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # The ranks agree because they trained together, not because nothing
    # moved: the weights changed from their initial values.
    changed = [
        name for name in first if not torch.equal(first[name], before[name])
    ]
    assert len(changed) > len(first) // 2
