"""Multi-scale deformable attention: the plugin's own compiled op.

``ms_deform_attn`` runs the compiled kernels of ``ddetr_plugin._C`` and
falls back to ``ms_deform_attn_reference`` (plain PyTorch) where they
cannot run; ``extension_loaded`` and ``extension_error`` tell which.
"""
from .extension import extension_error, extension_loaded
from .ms_deform_attn import ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = [
    'ms_deform_attn', 'ms_deform_attn_reference', 'extension_loaded',
    'extension_error'
]
