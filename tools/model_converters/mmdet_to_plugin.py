"""Convert an MMDetection 3.x Deformable or Conditional DETR checkpoint for
the plugin.

Usage::

    python tools/model_converters/mmdet_to_plugin.py IN.pth OUT.pth \
        [--config CONFIG] [--trust-input]

``IN`` is a checkpoint written by MMDetection 3.x (its ``state_dict`` entry,
or a bare state dict). ``OUT`` gets ``{'state_dict': ..., 'meta': ...}`` in
the plugin's layout. With ``--config``, the converted weights are loaded
strictly into the model that config builds, so a mismatch (variant flags,
num_classes...) is reported now rather than at training time.

MMDetection checkpoints hold pickled metadata beyond tensors; the input is
unpickled in full only with ``--trust-input``, for files you trust.
Without it, only tensors and the MMEngine types the plugin allow-lists load.
"""
import argparse
import os.path as osp
from typing import Optional

import torch

from ddetr_plugin.converters import (convert_mmdet_state_dict,
                                     load_into_config_model, save_converted)
from ddetr_plugin.converters.layouts import detector_of


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description='Convert an MMDetection 3.x Deformable or Conditional '
        'DETR checkpoint to the ddetr_plugin layout.')
    parser.add_argument('input', help='MMDetection checkpoint (.pth)')
    parser.add_argument('output', help='where to write the plugin checkpoint')
    parser.add_argument(
        '--config',
        help='plugin config whose model must accept the converted weights '
        '(strict check)')
    parser.add_argument(
        '--trust-input',
        action='store_true',
        help='unpickle the input in full (only for files you trust)')
    return parser.parse_args(argv)


def read_state_dict(path: str, trust: bool) -> dict:
    """The state dict inside an mmdet checkpoint file.

    Args:
        path (str): Checkpoint path.
        trust (bool): Whether to unpickle arbitrary objects.

    Returns:
        dict: Parameter name to tensor.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'No checkpoint file at {path!r}.')
    if trust:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False)
    else:
        from ddetr_plugin.utils.checkpoint import load_checkpoint_file
        checkpoint = load_checkpoint_file(path, map_location='cpu')
    state_dict = checkpoint.get('state_dict', checkpoint) if isinstance(
        checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(
            isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(
            f'{path!r} is not an MMDetection checkpoint: expected a dict of '
            'tensors, or a dict with a "state_dict" entry holding one.')
    return state_dict


def main(argv: Optional[list] = None) -> None:
    """Convert ``input`` to ``output``."""
    args = parse_args(argv)
    state_dict = read_state_dict(args.input, args.trust_input)
    converted = convert_mmdet_state_dict(state_dict)
    if args.config:
        load_into_config_model(converted, args.config)
    save_converted(
        converted,
        args.output,
        converted_from=osp.basename(args.input),
        source_layout=f'mmdet 3.x {detector_of(state_dict)}')
    print(f'Wrote {len(converted)} tensors to {args.output}')


if __name__ == '__main__':
    main()
