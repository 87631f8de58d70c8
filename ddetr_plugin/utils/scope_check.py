"""A warning when mmdet's Deformable DETR is built instead of the plugin's.

A config inheriting one of mmdet's (``_base_ = 'mmdet::...'``) carries
``_scope_='mmdet'`` in its ``model``: MMEngine builds it in mmdet's scope
whatever ``default_scope`` says. Setting ``default_scope = 'ddetr_plugin'``
instead of ``model = dict(_scope_='ddetr_plugin')`` (a natural guess) thus
trains mmdet's own ``DeformableDETR`` without a word.
:func:`warn_on_mmdet_deformable_detr` makes every later construction of
mmdet's ``DeformableDETR`` in a program whose default scope is the
plugin's warn, whichever tool built it (the plugin's, mmdet's,
``init_detector``).
"""
import warnings
import weakref
from typing import Optional

import torch
from mmengine.registry import DefaultScope

PLUGIN_SCOPE = 'ddetr_plugin'
# DefaultScope.overwrite_default_scope names the temporary scopes it puts
# on top while MMEngine builds an object of another scope.
TEMPORARY_SCOPE_PREFIX = 'overwrite-'


class MmdetModelWarning(UserWarning):
    """mmdet's model was built where the plugin's was probably meant."""


def program_scope() -> Optional[str]:
    """The default scope the program set (a runner's, or
    ``init_default_scope``'s), under any temporary one a build puts on top;
    None when none is set."""
    instances = DefaultScope._instance_dict
    for name in reversed(list(instances)):
        if not name.startswith(TEMPORARY_SCOPE_PREFIX):
            return instances[name].scope_name
    return None


def warn_on_mmdet_deformable_detr() -> torch.utils.hooks.RemovableHandle:
    """Warn, once per model, when mmdet's ``DeformableDETR`` is constructed
    while the program's default scope is the plugin's.

    The check runs when the detector registers its first submodule (a
    registration hook common to all modules: a type check per
    registration).

    Returns:
        RemovableHandle: The hook's handle.
    """
    from mmdet.models.detectors import DeformableDETR
    warned = weakref.WeakSet()

    def hook(module, name, submodule) -> None:
        if type(module) is not DeformableDETR or module in warned:
            return
        warned.add(module)
        if program_scope() != PLUGIN_SCOPE:
            return
        warnings.warn(
            'the model built is mmdet\'s DeformableDETR '
            '(mmdet.models.detectors.DeformableDETR), not the plugin\'s, '
            f'although default_scope is {PLUGIN_SCOPE!r}: a config '
            'inheriting mmdet\'s builds its model in mmdet\'s scope '
            '(model._scope_=\'mmdet\'), whatever default_scope says. To use '
            'the plugin\'s Deformable DETR, add '
            f'model = dict(_scope_={PLUGIN_SCOPE!r}) to the config.',
            MmdetModelWarning,
            stacklevel=2)

    return torch.nn.modules.module.register_module_module_registration_hook(
        hook)
