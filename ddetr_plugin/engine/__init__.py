"""Training and testing machinery of the plugin.

Importing this package registers :class:`AtomicCheckpointHook` in the
``ddetr_plugin`` scope.
"""
from .atomic_io import atomic_write_bytes, atomic_write_text
from .checkpoint_check import CheckpointMismatchError, check_checkpoint_matches
from .checkpoint_hook import AtomicCheckpointHook
from .dataset_check_hook import DatasetCheckHook, DatasetModelMismatchError
from .fine_tuning import skip_class_layers_on_load
from .launch import load_config, prepare_distributed, use_plugin_scope
# Imported to register MmdetCheckpointHook.
from .mmdet_checkpoint_hook import MmdetCheckpointHook  # noqa: F401
from .visualization_hook import ScaledDetVisualizationHook

__all__ = [
    'AtomicCheckpointHook', 'CheckpointMismatchError', 'atomic_write_bytes',
    'atomic_write_text', 'check_checkpoint_matches', 'load_config',
    'prepare_distributed', 'skip_class_layers_on_load', 'use_plugin_scope'
]
# Hooks that check the data and draw the detections.
__all__ += [
    'DatasetCheckHook', 'DatasetModelMismatchError',
    'ScaledDetVisualizationHook'
]
