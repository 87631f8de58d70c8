"""Loading a checkpoint of another ``num_classes`` without MMEngine's noise.

Fine-tuning through ``load_from`` with another number of classes leaves the
head's classification layers at their initial values; the checkpoint check
says so in one warning. MMEngine's loader then prints its own message, "The
model and loaded state dict do not match exactly", with one size-mismatch
line per layer (8 for the two-stage model), which reads as an error and
contradicts the warning. :func:`skip_class_layers_on_load` leaves those
layers out of the load instead, so that MMEngine has nothing to report about
them; any other difference is still reported.
"""
from typing import Dict, List

import torch
from mmengine.model import is_model_wrapper
from torch.utils.hooks import RemovableHandle

from ..converters.mmdet import CLASS_LAYER_KEY


def _drop_resized_class_layers(model: torch.nn.Module, skipped: List[str]):
    """Load-state-dict pre-hook of the model that removes the
    classification layers whose shape differs from the model's."""
    shapes: Dict[str, torch.Size] = {
        key: value.shape
        for key, value in model.state_dict().items()
        if CLASS_LAYER_KEY.match(key)
    }

    def hook(module, state_dict, prefix, *args) -> None:
        for key, shape in shapes.items():
            value = state_dict.get(prefix + key)
            if isinstance(value, torch.Tensor) and value.shape != shape:
                del state_dict[prefix + key]
                skipped.append(prefix + key)

    return hook


def _forget_missing(skipped: List[str]):
    """Load-state-dict post-hook that removes the skipped layers from the
    missing keys (edited in place, as PyTorch and MMEngine expect)."""

    def hook(module, incompatible_keys) -> None:
        for key in skipped:
            if key in incompatible_keys.missing_keys:
                incompatible_keys.missing_keys.remove(key)

    return hook


def skip_class_layers_on_load(model: torch.nn.Module) -> List[RemovableHandle]:
    """Leave classification layers of another ``num_classes`` out of every
    later ``load_state_dict`` of ``model``.

    Call it only once the checkpoint was accepted for fine-tuning
    (``check_checkpoint_matches(..., allow_class_change=True)``): the layers
    stay at their initial values exactly as when PyTorch skips a shape
    mismatch, but without MMEngine's mismatch message.

    Args:
        model (nn.Module): The detector, possibly wrapped. Its own load
            hooks (the conversion of mmdet's layout) run first, so the keys
            compared are the model's.

    Returns:
        list[RemovableHandle]: The two hooks' handles.
    """
    if is_model_wrapper(model):
        model = model.module
    skipped: List[str] = []
    return [
        model.register_load_state_dict_pre_hook(
            _drop_resized_class_layers(model, skipped)),
        model.register_load_state_dict_post_hook(_forget_missing(skipped))
    ]
