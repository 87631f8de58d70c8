"""Deformable DETR as an MMDetection 3.x plugin.

``custom_imports=dict(imports=['ddetr_plugin'])`` in a config is all a user
needs: importing the package registers the plugin's components in the
``ddetr_plugin`` registry scope and lets MMEngine load its own checkpoints
under PyTorch's weights-only unpickler and resolve ``torchvision://``
checkpoints without torchvision.

The op (``ddetr_plugin.ops``) needs torch alone, so on a machine without
MMDetection (a bare GPU box running the op tests and benchmarks) the package
still imports and says what is missing.
"""
import warnings

from .version import __version__

try:
    import mmdet  # noqa: F401
except ImportError as error:
    warnings.warn(
        f'ddetr_plugin: MMDetection is not importable ({error}); only '
        'ddetr_plugin.ops is available. Install mmdet==3.3.0 to use the '
        'models, data sets and tools.')
else:
    from .utils.checkpoint import enable_safe_checkpoint_loading
    from .utils.flops import register_flop_counter
    from .utils.scope_check import warn_on_mmdet_deformable_detr
    from .utils.torchvision_weights import register_torchvision_scheme
    enable_safe_checkpoint_loading()
    # torchvision://resnet50 (the COCO configs' backbone) without
    # torchvision, which cannot be imported with the CPU build of torch.
    register_torchvision_scheme()
    # default_scope='ddetr_plugin' does not make a config inheriting mmdet's
    # build the plugin's model: say so when that happens.
    warn_on_mmdet_deformable_detr()
    # mmdet's get_flops.py counts the op only with its formula registered.
    register_flop_counter()
    # Imported for registration only.
    from . import datasets, engine, models  # noqa: F401
    from .registry import expose_new_names

    # Names mmdet lacks (CheckedCocoDataset...) resolve in its scope too.
    expose_new_names()

__all__ = ['__version__']
