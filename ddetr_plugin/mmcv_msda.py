"""The config line that puts the plugin's op under mmcv's attention.

In any MMDetection config (DINO, DDQ-DETR, Grounding DINO, Mask2Former,
mmdet's Deformable DETR...)::

    custom_imports = dict(
        imports=['ddetr_plugin.mmcv_msda'], allow_failed_imports=False)

Importing this module calls ``enable()``: every mmcv
``MultiScaleDeformableAttention`` of the process then samples with the
plugin's op, and says so in one log line. ``disable()`` switches back;
``enabled()`` is a context manager for tests. Importing ``ddetr_plugin``
alone changes nothing in mmcv.
"""
from .mmcv_patch import disable, enable, enabled, is_enabled

__all__ = ['enable', 'disable', 'enabled', 'is_enabled']

enable()
