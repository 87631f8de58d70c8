"""plot_training.py comparing several runs (the convergence study)."""
import json
import os
import os.path as osp

import pytest

from testkit import load_script

PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def plot_tool():
    return load_script('tools/analysis_tools/plot_training.py')


def _write_run(work_dir, name, records):
    folder = osp.join(work_dir, name, 'vis_data')
    os.makedirs(folder)
    with open(osp.join(folder, 'scalars.json'), 'w') as file:
        for record in records:
            file.write(json.dumps(record) + '\n')


def _training(epochs_and_maps, small=0.1):
    """Records of a training run: a loss line and a validation per epoch."""
    records = []
    for epoch, mean_ap in epochs_and_maps:
        records.append(dict(loss=1.0 / epoch, step=epoch * 10))
        records.append({
            'coco/bbox_mAP': mean_ap,
            'coco/bbox_mAP_s': small * epoch,
            'step': epoch
        })
    return records


def test_comparison_joins_resumed_runs_and_counts_from_the_baseline(
        plot_tool, tmp_path, capsys):
    baseline = str(tmp_path / 'detr')
    fast = str(tmp_path / 'fast')
    _write_run(baseline, '20260101_000000',
               _training([(1, 0.05), (2, 0.10), (3, 0.20)]))
    # Interrupted after epoch 2 and resumed: two runs make one curve; the
    # second run's epoch 2 (validated again) wins.
    _write_run(fast, '20260101_000000', _training([(1, 0.15), (2, 0.18)]))
    _write_run(fast, '20260102_000000',
               _training([(2, 0.25), (3, 0.30)], small=0.2))
    # A test run in the same folder (no loss) is not part of the curve.
    _write_run(fast, '20260103_000000', [{'coco/bbox_mAP': 0.9, 'step': 0}])
    out = str(tmp_path / 'compare.png')
    table_file = str(tmp_path / 'table.md')
    assert plot_tool.main([
        baseline, fast, '--labels', 'DETR', 'Fast', '--out', out, '--table',
        table_file
    ]) == 0
    with open(out, 'rb') as file:
        assert file.read(8) == PNG
    with open(table_file) as file:
        rows = file.read().splitlines()
    assert 'mAP >= 0.200 (DETR final)' in rows[0]
    # best (epoch), best AP small, final, first epoch reaching 0.200.
    assert rows[2] == '| DETR | 3 | 0.200 (3) | 0.300 | 0.200 | 3 |'
    assert rows[3] == '| Fast | 3 | 0.300 (3) | 0.600 | 0.300 | 2 |'
    assert rows[3] in capsys.readouterr().out


def test_a_run_that_never_reaches_the_baseline_says_so(plot_tool):
    runs = {
        'base': {
            1: {
                'coco/bbox_mAP': 0.4,
                'coco/bbox_mAP_s': 0.1
            }
        },
        'slow': {
            1: {
                'coco/bbox_mAP': 0.1,
                'coco/bbox_mAP_s': 0.0
            },
            2: {
                'coco/bbox_mAP': 0.39,
                'coco/bbox_mAP_s': 0.0
            }
        },
    }
    assert plot_tool.summary_table(runs).splitlines()[3].endswith(
        '| not reached |')


def test_comparison_errors_name_the_problem(plot_tool, tmp_path):
    first = str(tmp_path / 'a')
    second = str(tmp_path / 'b')
    _write_run(first, '20260101_000000', _training([(1, 0.1)]))
    # Trained without validation: nothing to compare.
    _write_run(second, '20260101_000000', [dict(loss=1.0, step=1)])
    out = str(tmp_path / 'x.png')
    with pytest.raises(FileNotFoundError, match='val_interval=1'):
        plot_tool.main([first, second, '--out', out])
    with pytest.raises(SystemExit):
        plot_tool.main([first, second])  # no --out
    with pytest.raises(SystemExit):
        plot_tool.main([first, second, '--out', out, '--labels', 'only'])
    with pytest.raises(SystemExit):
        plot_tool.main([first, second, '--out', out, '--labels', 'x', 'x'])
    with pytest.raises(SystemExit):
        plot_tool.main([first, '--table', str(tmp_path / 't.md')])
