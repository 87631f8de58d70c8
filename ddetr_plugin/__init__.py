"""Deformable DETR as an MMDetection 3.x plugin.

``custom_imports=dict(imports=['ddetr_plugin'])`` in a config is all a user
needs: importing the package registers the plugin's components in the
``ddetr_plugin`` registry scope and lets MMEngine load its own checkpoints
under PyTorch's weights-only unpickler.
"""
from .utils.checkpoint import enable_safe_checkpoint_loading
from .version import __version__

enable_safe_checkpoint_loading()

# Imported for registration only.
from . import datasets, models  # noqa: E402, F401
from .registry import SCOPE  # noqa: E402

__all__ = ['__version__', 'SCOPE', 'enable_safe_checkpoint_loading']
