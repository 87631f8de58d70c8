"""DETR's encoder: dense multi-head self-attention over one feature map.

Conditional DETR keeps DETR's encoder: every position of the (stride 32,
or 16 with a dilated C5) map attends to every other, with the sine
encoding of both positions added to queries and keys. Layers are
post-norm (attention, add, norm; feed-forward, add, norm) and there is no
norm after the last layer.
"""
from typing import Optional

from mmengine.model import BaseModule
from torch import Tensor, nn

from .feedforward import FeedForward
from .multihead_attention import build_self_attention, self_attend


class DetrEncoderLayer(BaseModule):
    """Self-attention then a feed-forward block, each post-norm.

    Args:
        self_attn_cfg (dict): ``embed_dims``, ``num_heads`` and ``dropout``
            (on the attention weights and on the output, as in mmcv).
        ffn_cfg (dict): Arguments of :class:`FeedForward`.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 self_attn_cfg: dict,
                 ffn_cfg: dict,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.self_attn, self.self_attn_dropout = build_self_attention(
            self_attn_cfg,
            type(self).__name__)
        self.embed_dims = self.self_attn.embed_dim
        self.self_attn_norm = nn.LayerNorm(self.embed_dims)
        self.ffn = FeedForward(**ffn_cfg)
        self.ffn_norm = nn.LayerNorm(self.embed_dims)

    def forward(self, query: Tensor, query_pos: Tensor,
                key_padding_mask: Optional[Tensor]) -> Tensor:
        """Update every position of the flattened map.

        Args:
            query (Tensor): (bs, num_keys, embed_dims).
            query_pos (Tensor): (bs, num_keys, embed_dims) sine encoding.
            key_padding_mask (Tensor, optional): (bs, num_keys) bool, True
                at padding.

        Returns:
            Tensor: (bs, num_keys, embed_dims).
        """
        attended = self_attend(self.self_attn, query, query_pos,
                               key_padding_mask)
        query = self.self_attn_norm(query + self.self_attn_dropout(attended))
        return self.ffn_norm(self.ffn(query))


class DetrEncoder(BaseModule):
    """A stack of :class:`DetrEncoderLayer`.

    Args:
        num_layers (int): Number of layers. Defaults to 6.
        layer_cfg (dict, optional): Arguments of every layer; DETR's
            (256 channels, 8 heads, 2048 hidden, dropout 0.1) by default.
        num_cp (int): Must be -1 (no activation checkpointing); accepted
            so mmdet-style configs work. Defaults to -1.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 num_layers: int = 6,
                 layer_cfg: Optional[dict] = None,
                 num_cp: int = -1,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if num_cp != -1:
            raise ValueError('DetrEncoder has no activation checkpointing; '
                             f'set num_cp=-1 (got {num_cp!r}).')
        if layer_cfg is None:
            layer_cfg = dict(
                self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.1),
                ffn_cfg=dict(
                    embed_dims=256, feedforward_channels=2048, ffn_drop=0.1))
        self.layers = nn.ModuleList(
            [DetrEncoderLayer(**layer_cfg) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].embed_dims

    def forward(self, query: Tensor, query_pos: Tensor,
                key_padding_mask: Optional[Tensor]) -> Tensor:
        """Run every layer.

        Args:
            query (Tensor): (bs, num_keys, embed_dims) flattened map.
            query_pos (Tensor): (bs, num_keys, embed_dims).
            key_padding_mask (Tensor, optional): (bs, num_keys) bool, True
                at padding.

        Returns:
            Tensor: (bs, num_keys, embed_dims), the memory.
        """
        for layer in self.layers:
            query = layer(query, query_pos, key_padding_mask)
        return query
