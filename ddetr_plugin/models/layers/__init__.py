"""Transformer building blocks of Deformable DETR and Conditional DETR.

Importing this package registers :class:`MultiScaleDeformableAttention`,
:class:`SinePositionalEncoding`, :class:`DeformableDetrTransformer` and
:class:`ConditionalDetrTransformer` in the ``ddetr_plugin`` scope.
"""
from .conditional_attention import ConditionalAttention
from .conditional_decoder import (ConditionalDetrDecoder,
                                  ConditionalDetrDecoderLayer)
from .conditional_transformer import ConditionalDetrTransformer
from .decoder import (DeformableDetrDecoder, DeformableDetrDecoderLayer,
                      inverse_sigmoid)
from .detr_encoder import DetrEncoder, DetrEncoderLayer
from .encoder import DeformableDetrEncoder, DeformableDetrEncoderLayer
from .feedforward import FeedForward
from .mlp import build_mlp
from .ms_deform_attn import MultiScaleDeformableAttention
from .positional_encoding import (SinePositionalEncoding,
                                  point_positional_encoding,
                                  proposal_positional_encoding)
from .transformer import DeformableDetrTransformer, MultiScaleInputs, Queries

__all__ = [
    'ConditionalAttention', 'ConditionalDetrDecoder',
    'ConditionalDetrDecoderLayer', 'ConditionalDetrTransformer', 'DetrEncoder',
    'DetrEncoderLayer', 'build_mlp', 'point_positional_encoding',
    'DeformableDetrDecoder', 'DeformableDetrDecoderLayer',
    'DeformableDetrEncoder', 'DeformableDetrEncoderLayer',
    'DeformableDetrTransformer', 'FeedForward',
    'MultiScaleDeformableAttention', 'MultiScaleInputs', 'Queries',
    'SinePositionalEncoding', 'inverse_sigmoid', 'proposal_positional_encoding'
]
