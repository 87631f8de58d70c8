"""Two-process training through tools/dist_train.sh (torchrun) and
tools/slurm_train.sh on a CPU.

Without CUDA the processes must talk over gloo, and data-parallel training
must leave both ranks with the same weights. There is no SLURM here: a
stand-in ``srun`` starts one process per task with SLURM's task variables,
as srun does on one node, and records the options it was given.
"""
import json
import os
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


def _launch(helpers, script, arguments, extra_env=None):
    """Run tools/<script> with two processes; fail with its output."""
    env = helpers.tool_environment(
        dict(
            PYTHON=sys.executable,
            PORT=str(helpers.free_port()),
            **(extra_env or {})))
    result = subprocess.run(
        ['bash', osp.join(helpers.repo, 'tools', script)] + arguments,
        cwd=helpers.repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout[-6000:]
    return result


@pytest.fixture(scope='module')
def distributed_run(helpers, toy_data, tmp_path_factory):
    """(config, work dir) of a one-epoch training run on two processes."""
    folder = str(tmp_path_factory.mktemp('distributed'))
    work_dir = osp.join(folder, 'work')
    config = helpers.write_tiny_config(
        folder, toy_data, max_epochs=1, val_interval=10)
    _launch(helpers, 'dist_train.sh', [config, '2', '--work-dir', work_dir])
    return config, work_dir


def _assert_ranks_trained_together(work_dir):
    """Both ranks end with the same weights, changed by training."""
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


def test_two_ranks_train_to_identical_weights(distributed_run):
    _assert_ranks_trained_together(distributed_run[1])


def test_two_ranks_evaluate_every_image_once(helpers, distributed_run,
                                             toy_data, tmp_path):
    config, work_dir = distributed_run
    prefix = str(tmp_path / 'results')
    _launch(helpers, 'dist_test.sh', [
        config,
        osp.join(work_dir, 'epoch_1.pth'), '2', '--work-dir',
        str(tmp_path), '--cfg-options',
        f'test_evaluator.outfile_prefix={prefix}'
    ])
    with open(tmp_path / 'test_metrics.json') as file:
        assert 0 <= json.load(file)['coco/bbox_mAP'] <= 1
    with open(prefix + '.bbox.json') as file:
        detections = json.load(file)
    # Each rank tests half of the images and rank 0 gathers all four:
    # 10 queries x 10 classes give exactly 100 detections per image, so an
    # image evaluated twice would show 200.
    per_image = {}
    for detection in detections:
        per_image[detection['image_id']] = per_image.get(
            detection['image_id'], 0) + 1
    assert sorted(per_image) == [1, 2, 3, 4]
    assert all(count == 100 for count in per_image.values())


# srun on one node: one process per task with SLURM's task variables.
FAKE_SRUN = """#!{python}
import json, os, subprocess, sys
arguments = sys.argv[1:]
options = []
while arguments and arguments[0].startswith('-'):
    option = arguments.pop(0)
    if option == '-p':
        option += '=' + arguments.pop(0)
    options.append(option)
with open(os.environ['FAKE_SRUN_LOG'], 'w') as file:
    json.dump(dict(options=options, command=arguments), file)
num_tasks = int([o for o in options if o.startswith('--ntasks=')][0][9:])
processes = [
    subprocess.Popen(arguments, env=dict(
        os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
        SLURM_NTASKS=str(num_tasks), SLURM_NODELIST='node0'))
    for rank in range(num_tasks)
]
sys.exit(max(process.wait() for process in processes))
"""
# scontrol show hostname node0 | head -n1: the first node's address.
FAKE_SCONTROL = '#!/bin/sh\necho 127.0.0.1\n'


def test_slurm_train_runs_one_rank_per_task(helpers, toy_data, tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('srun', FAKE_SRUN.format(python=sys.executable)),
                       ('scontrol', FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / 'srun.json'
    work_dir = str(tmp_path / 'work')
    config = helpers.write_tiny_config(
        str(tmp_path), toy_data, max_epochs=1, val_interval=10)
    _launch(
        helpers,
        'slurm_train.sh', ['debug', 'ddetr', config, work_dir],
        extra_env=dict(
            PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
            GPUS='2',
            GPUS_PER_NODE='2',
            CPUS_PER_TASK='1',
            MASTER_PORT=str(helpers.free_port()),
            FAKE_SRUN_LOG=str(log)))
    with open(log) as file:
        srun = json.load(file)
    for option in ('-p=debug', '--job-name=ddetr', '--gres=gpu:2',
                   '--ntasks=2', '--ntasks-per-node=2', '--cpus-per-task=1'):
        assert option in srun['options']
    assert srun['command'][-3:] == [
        config, f'--work-dir={work_dir}', '--launcher=slurm'
    ]
    _assert_ranks_trained_together(work_dir)
