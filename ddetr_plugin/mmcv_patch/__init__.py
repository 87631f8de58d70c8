"""mmcv's multi-scale deformable attention on the plugin's op.

Importing this package changes nothing; ``enable()`` (or importing
``ddetr_plugin.mmcv_msda``, the config line) switches mmcv's
``MultiScaleDeformableAttention`` to the plugin's op and ``disable()``
switches it back.
"""
from .switch import disable, enable, enabled, is_enabled, mmcv_mismatches

__all__ = ['enable', 'disable', 'enabled', 'is_enabled', 'mmcv_mismatches']
