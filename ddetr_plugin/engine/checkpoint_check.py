"""Refusing to run a model with weights from a different model.

MMEngine loads checkpoints with ``strict=False`` and only logs the keys that
did not match, so ``tools/test.py`` given another model's checkpoint reports
the accuracy of a mostly random model, ``load_from`` trains from mostly
random weights, and ``--resume`` crashes inside the first optimizer step.
:func:`check_checkpoint_matches` compares the checkpoint's state dict with
the model's before testing or training and raises with the lists of
missing, unexpected and mis-shaped keys.

Weights in the layout of MMDetection 3.x's Deformable DETR pass when,
renamed in memory, they fit the model exactly (the model renames them again
as it loads them); weights of the official repository get the command of
their converter. With ``allow_class_change`` (``load_from`` in
``tools/train.py``), weights of either layout that differ only in the
head's classification layers pass with a warning: the usual fine-tuning on
data with another number of classes (e.g. from mmdet's COCO checkpoint).
"""
import logging
from typing import Dict, List, Optional

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.runner.checkpoint import _load_checkpoint

from ..converters.in_memory import convert_for_model
from ..converters.layouts import conversion_hint, foreign_layout
from ..converters.mmdet import CLASS_LAYER_KEY, CheckpointMismatchError

# How many keys of each kind an error lists before it only counts them.
MAX_LISTED = 10


def _strip_wrapper_prefix(state_dict: Dict[str, object]) -> Dict[str, object]:
    """Remove the ``module.`` prefix that (Distributed)DataParallel adds."""
    if state_dict and all(key.startswith('module.') for key in state_dict):
        return {
            key[len('module.'):]: value
            for key, value in state_dict.items()
        }
    return state_dict


def _listing(title: str, keys: List[str]) -> str:
    shown = ', '.join(keys[:MAX_LISTED])
    more = len(keys) - MAX_LISTED
    suffix = f', ... ({more} more)' if more > 0 else ''
    return f'\n  {len(keys)} {title}: {shown}{suffix}'


def compare_state_dicts(model_state: Dict[str, torch.Tensor],
                        checkpoint_state: Dict[str, object]) -> Dict:
    """Keys of a checkpoint that do not fit a model.

    Args:
        model_state (dict[str, Tensor]): ``model.state_dict()``.
        checkpoint_state (dict[str, object]): The checkpoint's state dict.

    Returns:
        dict: ``missing`` (in the model only), ``unexpected`` (in the
        checkpoint only) and ``mismatched`` (``'key: checkpoint shape vs
        model shape'`` strings), each a sorted list.
    """
    missing = sorted(set(model_state) - set(checkpoint_state))
    unexpected = sorted(set(checkpoint_state) - set(model_state))
    mismatched = []
    for key in sorted(set(model_state) & set(checkpoint_state)):
        saved = checkpoint_state[key]
        wanted = model_state[key]
        if isinstance(saved, torch.Tensor) and saved.shape != wanted.shape:
            mismatched.append(f'{key}: {tuple(saved.shape)} in the '
                              f'checkpoint vs {tuple(wanted.shape)} in the '
                              'model')
    return dict(missing=missing, unexpected=unexpected, mismatched=mismatched)


def _load_state_dict(filename: str) -> Dict[str, object]:
    checkpoint = _load_checkpoint(filename, map_location='cpu')
    if not isinstance(checkpoint, dict):
        raise CheckpointMismatchError(
            f'{filename!r} holds a {type(checkpoint).__name__}, expected a '
            'dict of weights or a dict with a "state_dict" entry')
    return _strip_wrapper_prefix(checkpoint.get('state_dict', checkpoint))


def _raise_if_foreign(state: Dict[str, object], filename: str,
                      config: Optional[str]) -> None:
    layout = foreign_layout(state)
    if layout is not None:
        raise CheckpointMismatchError(
            conversion_hint(layout, filename, config))


def _class_layers_only(differences: Dict) -> bool:
    """True when the only differences are the classification layers'
    shapes (a model of the same architecture with another class count)."""
    mismatched = differences['mismatched']
    return (not differences['missing'] and not differences['unexpected']
            and bool(mismatched) and all(
                CLASS_LAYER_KEY.match(entry.split(':', 1)[0])
                for entry in mismatched))


def _warn_class_change(filename: str, class_layers: List[str]) -> None:
    """Say which classification layers load_from leaves unloaded."""
    if not class_layers:
        return
    print_log(
        f'load_from {filename!r}: the classification layers differ in '
        'shape (another num_classes); they are not loaded and start '
        'from their initial values: ' + '; '.join(class_layers),
        logger='current',
        level=logging.WARNING)


def check_checkpoint_matches(model: torch.nn.Module,
                             filename: str,
                             config: Optional[str] = None,
                             allow_class_change: bool = False) -> List[str]:
    """Raise unless ``filename`` holds exactly the weights of ``model``.

    Args:
        model (nn.Module): The model to evaluate, possibly wrapped.
        filename (str): The checkpoint, loaded through MMEngine (and so
            through the plugin's weights-only loader for local files).
        config (str, optional): The config the model was built from,
            quoted in the converter command when the weights need one.
        allow_class_change (bool): Accept weights that differ only in the
            head's classification layers (fine-tuning with another
            ``num_classes`` through ``load_from``), with a warning: MMEngine
            then leaves those layers at their initial values. Defaults to
            False.

    Returns:
        list[str]: The classification layers accepted with another shape
        (``'key: ...'`` strings); empty when the weights fit exactly.

    Raises:
        CheckpointMismatchError: Naming the converter to run for weights in
            another implementation's layout; otherwise listing the missing,
            unexpected and mis-shaped keys.
    """
    if is_model_wrapper(model):
        model = model.module
    state = _load_state_dict(filename)
    if foreign_layout(state) == 'mmdet':
        try:
            _, class_layers = convert_for_model(state, model,
                                                allow_class_change)
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(
                f'checkpoint {filename!r} holds weights in the layout of '
                'MMDetection 3.x\'s Deformable DETR that do not fit the '
                f'model {type(model).__name__} of the config: {error}'
            ) from None
        _warn_class_change(filename, class_layers)
        return class_layers
    differences = compare_state_dicts(model.state_dict(), state)
    if allow_class_change and _class_layers_only(differences):
        _warn_class_change(filename, differences['mismatched'])
        return differences['mismatched']
    if any(differences.values()):
        _raise_if_foreign(state, filename, config)
        raise CheckpointMismatchError(
            f'checkpoint {filename!r} does not fit the model '
            f'{type(model).__name__} of the config; it was probably saved '
            'from another model or config:' +
            _listing('missing keys (in the model, not in the checkpoint)',
                     differences['missing']) +
            _listing('unexpected keys (in the checkpoint, not in the model)',
                     differences['unexpected']) +
            _listing('keys of a different shape', differences['mismatched']))
    return []
