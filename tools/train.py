"""Train a detector of the ``ddetr_plugin`` scope with MMEngine's Runner.

Usage is MMDetection's::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
        [--amp] [--auto-scale-lr] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm}]

``--resume`` alone continues from the checkpoint that ``WORK_DIR/
last_checkpoint`` names; with a path, from that checkpoint. Distributed
training goes through ``tools/dist_train.sh`` (torchrun) or
``tools/slurm_train.sh``; without CUDA it uses the gloo backend.

The checkpoint of ``load_from`` or ``--resume`` must fit the config's model
exactly (checked before training starts, with the keys that differ);
MMDetection 3.x's Deformable DETR checkpoints are converted in memory.
"""
import argparse
import os.path as osp
import sys
from typing import Optional

# The tools run from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from mmengine.config import Config
from mmengine.device import get_device
from mmengine.runner import Runner, find_latest_checkpoint

# Importing the plugin registers its classes.
import ddetr_plugin  # noqa: F401
from ddetr_plugin.engine import (MmdetCheckpointHook, checkpoint_check, launch,
                                 skip_class_layers_on_load)
from ddetr_plugin.registry import RUNNERS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Train a detector')
    parser.add_argument('config', help='config file')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='train with automatic mixed precision')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by the total batch size against the '
        "config's auto_scale_lr.base_batch_size")
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        help='resume from this checkpoint, or, without a value, from the '
        'one that WORK_DIR/last_checkpoint names')
    launch.add_common_arguments(parser)
    args = parser.parse_args(argv)
    launch.set_local_rank(args.local_rank)
    return args


def configure(args) -> Config:
    """The config with every command-line flag applied."""
    cfg = launch.load_config(args.config, args.cfg_options, args.work_dir,
                             args.launcher)
    if args.amp:
        if get_device() == 'cpu':
            raise ValueError(
                '--amp trains with MMEngine\'s AmpOptimWrapper, which needs '
                'a GPU (CUDA, NPU, MLU or MUSA); this machine has none, so '
                'train without --amp')
        optim_wrapper = cfg.get('optim_wrapper')
        if optim_wrapper is None:
            raise ValueError(f'--amp needs an optim_wrapper in {args.config}')
        optim_wrapper.type = 'AmpOptimWrapper'
        optim_wrapper.loss_scale = 'dynamic'
    if args.auto_scale_lr:
        auto_scale_lr = cfg.get('auto_scale_lr') or {}
        if 'base_batch_size' not in auto_scale_lr:
            raise ValueError(
                '--auto-scale-lr needs auto_scale_lr = dict(base_batch_size='
                f'...) in the config; {args.config} has auto_scale_lr = '
                f'{cfg.get("auto_scale_lr")!r}')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif args.resume is not None:
        if not osp.isfile(args.resume):
            raise FileNotFoundError(
                f'--resume checkpoint {args.resume!r} does not exist')
        cfg.resume = True
        cfg.load_from = args.resume
    launch.prepare_distributed(cfg)
    return cfg


def checkpoint_to_load(cfg: Config) -> Optional[str]:
    """The checkpoint the run will start from, if any: ``load_from``, the
    ``--resume`` path, or the one ``WORK_DIR/last_checkpoint`` names."""
    if cfg.get('resume') and not cfg.get('load_from'):
        return find_latest_checkpoint(cfg.work_dir)
    return cfg.get('load_from') or None


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = configure(args)
    runner = (
        Runner.from_cfg(cfg)
        if 'runner_type' not in cfg else RUNNERS.build(cfg))
    checkpoint = checkpoint_to_load(cfg)
    if checkpoint is not None and osp.isfile(checkpoint):
        # MMEngine loads weights non-strictly: another model's checkpoint
        # would train from mostly random weights (load_from) or crash in
        # the first optimizer step (--resume). Checked before the data
        # sets are even read.
        # Fine-tuning (load_from) may change num_classes; a resumed run
        # must be the same model, optimizer state included.
        class_layers = checkpoint_check.check_checkpoint_matches(
            runner.model,
            checkpoint,
            args.config,
            allow_class_change=not cfg.get('resume'))
        if class_layers:
            # Named in the check's warning; MMEngine would list them again
            # as an error-like mismatch.
            skip_class_layers_on_load(runner.model)
    # mmdet checkpoints: weights and optimizer state converted in memory.
    runner.register_hook(MmdetCheckpointHook())
    runner.train()
    return 0


if __name__ == '__main__':
    sys.exit(main())
