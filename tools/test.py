"""Evaluate a checkpoint of a ``ddetr_plugin`` detector with MMEngine.

Usage is MMDetection's::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--show-dir DIR] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm}]

The config's ``test_evaluator`` (MMDetection's ``CocoMetric``) prints the
COCO table; it is also written to ``WORK_DIR/coco_bbox_table.txt`` and the
metrics to ``WORK_DIR/test_metrics.json``. COCO result JSON files come from
``--cfg-options test_evaluator.outfile_prefix=PREFIX``
(``PREFIX.bbox.json``). ``--show-dir`` draws the predictions of every test
image into ``WORK_DIR/<timestamp>/<show-dir>`` without needing a display.

Unlike MMEngine's partial loading, a checkpoint whose weights do not fit the
model is refused with the lists of missing and unexpected keys. A checkpoint
of MMDetection 3.x's Deformable DETR is converted in memory.
"""
import argparse
import json
import os
import os.path as osp
import sys

# The tools run from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config
from mmengine.dist import is_main_process
from mmengine.runner import Runner

# Importing the plugin registers its classes.
import ddetr_plugin  # noqa: F401
from ddetr_plugin.engine import (MmdetCheckpointHook, atomic_io,
                                 checkpoint_check, coco_table, launch)
from ddetr_plugin.registry import RUNNERS

TABLE_FILE = 'coco_bbox_table.txt'
METRICS_FILE = 'test_metrics.json'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Test (and evaluate) a detector checkpoint')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out', help='also dump the raw predictions to this .pkl file')
    parser.add_argument(
        '--show-dir',
        help='draw the predictions into WORK_DIR/<timestamp>/SHOW_DIR')
    parser.add_argument(
        '--show',
        action='store_true',
        help='show the predictions in a window (needs a display)')
    parser.add_argument(
        '--wait-time',
        type=float,
        default=2,
        help='seconds each image stays on screen with --show')
    launch.add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        parser.error(f'--out must name a .pkl or .pickle file, got '
                     f'{args.out!r}')
    if args.show and sys.platform.startswith('linux') and not (
            os.environ.get('DISPLAY') or os.environ.get('WAYLAND_DISPLAY')):
        parser.error('--show needs a display and none is set (DISPLAY); '
                     'use --show-dir DIR to draw into files instead')
    launch.set_local_rank(args.local_rank)
    return args


def enable_drawing(cfg: Config, args) -> None:
    """Turn on the visualization hook for ``--show`` / ``--show-dir``."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError(
            '--show and --show-dir need default_hooks.visualization = '
            f"dict(type='DetVisualizationHook') in {args.config}")
    hook['draw'] = True
    if args.show:
        hook['show'] = True
        hook['wait_time'] = args.wait_time
    if args.show_dir:
        hook['test_out_dir'] = args.show_dir


def configure(args) -> Config:
    """The config with every command-line flag applied."""
    if not osp.isfile(args.checkpoint):
        raise FileNotFoundError(
            f'checkpoint {args.checkpoint!r} does not exist')
    cfg = launch.load_config(args.config, args.cfg_options, args.work_dir,
                             args.launcher)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.show or args.show_dir:
        enable_drawing(cfg, args)
    launch.prepare_distributed(cfg)
    return cfg


def save_results(work_dir: str, metrics: dict, tables) -> None:
    """Write the metrics and the printed COCO table into ``work_dir``."""
    os.makedirs(work_dir, exist_ok=True)
    atomic_io.atomic_write_text(
        osp.join(work_dir, METRICS_FILE),
        json.dumps(metrics, indent=2, sort_keys=True, default=float) + '\n')
    if tables:
        atomic_io.atomic_write_text(
            osp.join(work_dir, TABLE_FILE), '\n\n'.join(tables) + '\n')


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = configure(args)
    runner = (
        Runner.from_cfg(cfg)
        if 'runner_type' not in cfg else RUNNERS.build(cfg))
    checkpoint_check.check_checkpoint_matches(runner.model, args.checkpoint,
                                              args.config)
    # mmdet checkpoints: weights converted in memory.
    runner.register_hook(MmdetCheckpointHook())
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(
            DumpDetResults(out_file_path=args.out))
    with coco_table.CocoTableRecorder() as recorder:
        metrics = runner.test()
    if is_main_process():
        save_results(cfg.work_dir, metrics, recorder.tables)
    return 0


if __name__ == '__main__':
    sys.exit(main())
