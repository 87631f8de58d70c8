"""Multi-scale deformable attention: the plugin's own compiled op."""
from .reference import ms_deform_attn_reference

# Until the compiled op is wired up, the reference serves every call.
ms_deform_attn = ms_deform_attn_reference

__all__ = ['ms_deform_attn', 'ms_deform_attn_reference']
