"""Two-process training through tools/dist_train.sh (torchrun) on a CPU.

Without CUDA the processes must talk over gloo, and data-parallel training
must leave both ranks with the same weights.
"""
import json
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


def _launch(helpers, script, arguments):
    """Run tools/<script> with two processes; fail with its output."""
    env = helpers.tool_environment(
        dict(PYTHON=sys.executable, PORT=str(helpers.free_port())))
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


def test_two_ranks_train_to_identical_weights(distributed_run):
    _, work_dir = distributed_run
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
