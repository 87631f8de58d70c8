"""Converters of other implementations' Deformable DETR weights.

``convert_mmdet_state_dict`` maps MMDetection 3.x weights to the plugin's
layout; ``load_converted`` loads the result strictly with a readable error.
"""
from .mmdet import (CheckpointMismatchError, check_state_dict,
                    convert_mmdet_state_dict, load_converted,
                    load_into_config_model, save_converted)

__all__ = [
    'CheckpointMismatchError', 'check_state_dict', 'convert_mmdet_state_dict',
    'load_converted', 'load_into_config_model', 'save_converted'
]
