"""Dense multi-head self-attention with positions added to queries and keys.

DETR's encoder and the self-attention of Deformable DETR's decoder use the
same block: positions are added to queries and keys but not to values, and
dropout acts on the attention weights and on the output, as mmcv's
``MultiheadAttention`` does with its ``dropout`` argument. torch's
``nn.MultiheadAttention`` computes it; called without returning the
weights it runs ``F.scaled_dot_product_attention`` (fused kernels).
"""
from typing import Optional, Tuple

from torch import Tensor, nn


def build_self_attention(
        self_attn_cfg: dict,
        owner: str) -> Tuple[nn.MultiheadAttention, nn.Dropout]:
    """The attention and the dropout of its output, from an mmdet-style cfg.

    Args:
        self_attn_cfg (dict): ``embed_dims`` (256), ``num_heads`` (8) and
            ``dropout`` (0.0); ``batch_first`` is accepted (always True).
        owner (str): Class building it, for the error message.

    Returns:
        tuple: ``nn.MultiheadAttention`` (batch first) and ``nn.Dropout``.
    """
    self_attn_cfg = dict(self_attn_cfg)
    if self_attn_cfg.pop('batch_first', True) is not True:
        raise ValueError(f'{owner}: self_attn_cfg.batch_first must be True '
                         '(inputs are (bs, length, embed_dims)).')
    unknown = set(self_attn_cfg) - {'embed_dims', 'num_heads', 'dropout'}
    if unknown:
        raise ValueError(
            f'{owner}: self_attn_cfg takes embed_dims, num_heads and '
            f'dropout; got also {sorted(unknown)}.')
    dropout = self_attn_cfg.get('dropout', 0.0)
    attention = nn.MultiheadAttention(
        self_attn_cfg.get('embed_dims', 256),
        self_attn_cfg.get('num_heads', 8),
        dropout=dropout,
        batch_first=True)
    return attention, nn.Dropout(dropout)


def self_attend(attention: nn.MultiheadAttention,
                query: Tensor,
                query_pos: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Self-attention of ``query``, positions on queries and keys only.

    Args:
        attention (nn.MultiheadAttention): Batch first.
        query (Tensor): (bs, length, embed_dims).
        query_pos (Tensor): (bs, length, embed_dims).
        key_padding_mask (Tensor, optional): (bs, length) bool, True at
            padding.

    Returns:
        Tensor: (bs, length, embed_dims), without the shortcut.
    """
    with_pos = query + query_pos
    return attention(
        with_pos,
        with_pos,
        query,
        key_padding_mask=key_padding_mask,
        need_weights=False)[0]
