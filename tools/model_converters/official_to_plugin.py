"""Convert an official Deformable-DETR or ConditionalDETR checkpoint for
the plugin.

Usage::

    python tools/model_converters/official_to_plugin.py IN.pth OUT.pth \
        [--variant {plain,refine,two-stage}] [--config CONFIG]

``IN`` is a checkpoint of github.com/fundamentalvision/Deformable-DETR (R50;
plain, +iterative box refinement, or +two-stage) or of
github.com/Atten4Vis/ConditionalDETR, recognised from its keys. ``OUT`` gets
``{'state_dict': ..., 'meta': ...}`` in the plugin's layout, with the
91-output COCO classifier reduced to MMDetection's 80 COCO classes. With
``--variant`` the checkpoint must be of that variant; with ``--config`` the
converted weights are loaded strictly into the model the config builds,
which must be of the checkpoint's detector.

The official checkpoints hold a pickled ``argparse.Namespace`` (the training
arguments). Only that class is allowed beyond tensors and plain containers;
``--trust-pickle`` unpickles the file in full, for a file you trust that
holds anything else (unpickling can run arbitrary code).
"""
import argparse
import os.path as osp
import sys
from typing import Optional

from ddetr_plugin.converters import (load_into_config_model, official,
                                     save_converted)
from ddetr_plugin.converters.layouts import CONFIG_FOLDERS, detector_of


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Convert an official Deformable-DETR or ConditionalDETR '
        'checkpoint to the ddetr_plugin layout (80 COCO classes).')
    parser.add_argument('input', help='official checkpoint (.pth)')
    parser.add_argument('output', help='where to write the plugin checkpoint')
    parser.add_argument(
        '--variant',
        choices=official.VARIANTS,
        help='expected variant of the checkpoint (checked): plain, refine '
        '(with_box_refine) or two-stage (with_box_refine and as_two_stage)')
    parser.add_argument(
        '--config',
        help='plugin config whose model must accept the converted weights '
        '(strict check)')
    parser.add_argument(
        '--keep-classes',
        action='store_true',
        help='keep the classifier as it is (91 outputs for COCO) instead of '
        'selecting the 80 COCO category ids')
    parser.add_argument(
        '--trust-pickle',
        action='store_true',
        help='unpickle the input in full instead of allowing only tensors, '
        'containers and argparse.Namespace; a pickle can run arbitrary '
        'code, so use this only for a file you trust')
    return parser.parse_args(argv)


def check_against_config(state_dict: dict, detector: str,
                         variant: Optional[str], config_path: str) -> None:
    """Build the config's model and load the weights strictly into it.

    The config must build the checkpoint's detector, and for Deformable
    DETR its variant: the variants share their key layout, so the config's
    flags are compared with the checkpoint's variant first (a refinement
    checkpoint would load into a plain model and silently compute something
    else).
    """
    from mmengine.config import Config
    config = Config.fromfile(config_path)
    config_detector = str(config.model.get('type', '')).split('.')[-1]
    if config_detector != detector:
        raise official.OfficialCheckpointError(
            f'{config_path} builds a {config_detector} but the checkpoint '
            f'holds official {detector} weights; give a {detector} config '
            f'(configs/{CONFIG_FOLDERS[detector]}/...)')
    if variant is not None:
        config_variant = official.variant_of_model_config(config.model)
        if config_variant != variant:
            raise official.OfficialCheckpointError(
                f'{config_path} builds a {config_variant!r} Deformable DETR '
                f'but the checkpoint is a {variant!r} one; use the config of '
                'that variant (with_box_refine / as_two_stage)')
    load_into_config_model(state_dict, config_path)


def main(argv: Optional[list] = None) -> None:
    """Convert ``input`` to ``output``."""
    args = parse_args(argv)
    checkpoint = official.load_official_checkpoint(args.input,
                                                   args.trust_pickle)
    state_dict = official.official_state_dict(checkpoint)
    detector = detector_of(state_dict) or 'DeformableDETR'
    variant = None
    if detector == 'DeformableDETR':
        variant = official.detect_variant(state_dict)
        if args.variant is not None:
            official.check_variant(state_dict, args.variant)
    elif args.variant is not None:
        raise official.OfficialCheckpointError(
            f'--variant {args.variant} is for Deformable-DETR checkpoints; '
            f'{args.input} holds official {detector} weights, which have no '
            'variants: leave --variant out')
    category_ids = None if args.keep_classes else official.COCO_CATEGORY_IDS
    converted = official.convert_official_state_dict(state_dict, category_ids)
    if args.config:
        check_against_config(converted, detector, variant, args.config)
    source = dict(
        DeformableDETR='official Deformable-DETR',
        ConditionalDETR='official ConditionalDETR')[detector]
    meta = dict(variant=variant) if variant else {}
    save_converted(
        converted,
        args.output,
        converted_from=osp.basename(args.input),
        source_layout=source,
        **meta)
    what = f'{variant} Deformable DETR' if variant else detector
    print(f'Wrote {len(converted)} tensors ({what}) to {args.output}')


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        # The converter's errors say what to change: no traceback needed.
        sys.exit(f'official_to_plugin: error: {error}')
