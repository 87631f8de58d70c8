"""The saved COCO table and the training-curve plot, on synthetic input."""
import json
import os
import os.path as osp
import sys

import pytest

from ddetr_plugin.engine.coco_table import CocoTableRecorder
from testkit import load_script

TABLE = [
    ' Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]'
    ' = 0.642',
    ' Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=1000'
    ' ] = 0.912',
]


def _load_plot_tool():
    return load_script('tools/analysis_tools/plot_training.py')


def test_recorder_keeps_each_printed_table_and_restores_stdout(capsys):
    original = sys.stdout
    with CocoTableRecorder() as recorder:
        print('Evaluating bbox...')
        print('\n'.join(TABLE))
        print('bbox_mAP_copypaste: 0.642')
        print('\n'.join(TABLE))
    assert sys.stdout is original
    assert recorder.tables == ['\n'.join(TABLE)] * 2
    # What the user sees is unchanged.
    assert capsys.readouterr().out.count(TABLE[0]) == 2


def _write_run(work_dir, name, records):
    folder = osp.join(work_dir, name, 'vis_data')
    os.makedirs(folder)
    with open(osp.join(folder, 'scalars.json'), 'w') as file:
        for record in records:
            file.write(json.dumps(record) + '\n')


def test_plot_uses_the_newest_training_run(tmp_path):
    plot_tool = _load_plot_tool()
    work_dir = str(tmp_path)
    train = [
        dict(loss=3.0 - step / 10, loss_cls=1.0, step=step)
        for step in range(1, 11)
    ] + [{
        'coco/bbox_mAP': 0.4,
        'coco/bbox_mAP_50': 0.7,
        'step': 1
    }]
    _write_run(work_dir, '20260101_000000', train)
    _write_run(work_dir, '20260102_000000', train[:3])
    # A later test run logs no loss and must not be picked.
    _write_run(work_dir, '20260103_000000', [{
        'coco/bbox_mAP': 0.5,
        'step': 0
    }])
    newest = plot_tool.newest_training_run(work_dir)
    assert osp.basename(osp.dirname(
        osp.dirname(newest))) == ('20260102_000000')
    assert plot_tool.main([work_dir]) == 0
    with open(osp.join(work_dir, 'training_curves.png'), 'rb') as file:
        assert file.read(8) == b'\x89PNG\r\n\x1a\n'


def test_plot_names_a_work_dir_without_training(tmp_path):
    plot_tool = _load_plot_tool()
    with pytest.raises(FileNotFoundError, match='scalars.json'):
        plot_tool.main([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match='nowhere'):
        plot_tool.main([str(tmp_path / 'nowhere')])


def test_plot_names_a_corrupt_line(tmp_path):
    plot_tool = _load_plot_tool()
    _write_run(str(tmp_path), '20260101_000000', [dict(loss=1.0, step=1)])
    path = osp.join(
        str(tmp_path), '20260101_000000', 'vis_data', 'scalars.json')
    with open(path, 'a') as file:
        file.write('{"loss": \n')
    with pytest.raises(ValueError, match='scalars.json, line 2'):
        plot_tool.read_scalars(path)
