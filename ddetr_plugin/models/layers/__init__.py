"""Transformer building blocks of Deformable DETR.

Importing this package registers :class:`MultiScaleDeformableAttention`,
:class:`SinePositionalEncoding` and :class:`DeformableDetrTransformer` in
the ``ddetr_plugin`` scope.
"""
from .decoder import (DeformableDetrDecoder, DeformableDetrDecoderLayer,
                      inverse_sigmoid)
from .encoder import DeformableDetrEncoder, DeformableDetrEncoderLayer
from .feedforward import FeedForward
from .ms_deform_attn import MultiScaleDeformableAttention
from .positional_encoding import (SinePositionalEncoding,
                                  proposal_positional_encoding)
from .transformer import DeformableDetrTransformer, MultiScaleInputs, Queries

__all__ = [
    'DeformableDetrDecoder', 'DeformableDetrDecoderLayer',
    'DeformableDetrEncoder', 'DeformableDetrEncoderLayer',
    'DeformableDetrTransformer', 'FeedForward',
    'MultiScaleDeformableAttention', 'MultiScaleInputs', 'Queries',
    'SinePositionalEncoding', 'inverse_sigmoid', 'proposal_positional_encoding'
]
