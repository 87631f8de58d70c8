"""``tools/analysis_tools/benchmark_mmcv_models.py --attention-only``, the
stage gpu_check.sh runs with mmcv's CUDA kernel, at one shape on the CPU
(mmcv's grid_sample path there)."""
import json
import os.path as osp
import subprocess
import sys

from testkit import REPO

SCRIPT = osp.join(REPO, 'tools', 'analysis_tools', 'benchmark_mmcv_models.py')


def test_attention_only_times_mmcv_and_the_plugin(tmp_path):
    rows_file = tmp_path / 'rows.json'
    command = [
        sys.executable, SCRIPT, '--attention-only', '--shapes', 'dino-decoder',
        '--runs', '1', '--warmup', '0', '--threads', '1', '--json',
        str(rows_file)
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'mmcv\'s kernel (mmcv-pytorch): loaded' in result.stdout
    report = json.loads(rows_file.read_text())
    passes = [(row['shape'], row['pass_']) for row in report['rows']]
    assert passes == [('dino-decoder', 'forward'),
                      ('dino-decoder', 'forward+backward')]
    for row in report['rows']:
        assert row['mmcv_ms'] > 0 and row['plugin_ms'] > 0
    assert len(report['load_before']) == 3
