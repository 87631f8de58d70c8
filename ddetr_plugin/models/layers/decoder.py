"""The Deformable DETR decoder: object queries reading the encoder memory.

Each layer lets the queries exchange information (ordinary multi-head
self-attention), then sample the memory around their reference points
(deformable cross-attention). With box refinement, every layer's regression
branch moves the references before the next layer reads them.
"""
from typing import Optional, Tuple

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from .feedforward import FeedForward
from .ms_deform_attn import MultiScaleDeformableAttention
from .multihead_attention import build_self_attention, self_attend


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x``, clamped so that 0 and 1 stay finite.

    Args:
        x (Tensor): Any shape, values in [0, 1].
        eps (float): Smallest probability kept away from 0 and 1.

    Returns:
        Tensor: Same shape as ``x``.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class DeformableDetrDecoderLayer(BaseModule):
    """Self-attention, deformable cross-attention, feed-forward; post-norm.

    Args:
        self_attn_cfg (dict): ``embed_dims``, ``num_heads`` and ``dropout``
            of the queries' multi-head self-attention (``dropout`` applies to
            the attention weights and to its output, as in mmcv).
        cross_attn_cfg (dict): Arguments of
            :class:`MultiScaleDeformableAttention`; it always runs batch
            first here.
        ffn_cfg (dict): Arguments of :class:`FeedForward`.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 self_attn_cfg: dict,
                 cross_attn_cfg: dict,
                 ffn_cfg: dict,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.self_attn, self.self_attn_dropout = build_self_attention(
            self_attn_cfg,
            type(self).__name__)
        self.embed_dims = self.self_attn.embed_dim
        self.self_attn_norm = nn.LayerNorm(self.embed_dims)
        self.cross_attn = MultiScaleDeformableAttention(
            **{
                **cross_attn_cfg, 'batch_first': True
            })
        self.cross_attn_norm = nn.LayerNorm(self.embed_dims)
        self.ffn = FeedForward(**ffn_cfg)
        self.ffn_norm = nn.LayerNorm(self.embed_dims)

    def forward(self, query: Tensor, query_pos: Tensor, memory: Tensor,
                memory_mask: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """Update the object queries once.

        Args:
            query (Tensor): (bs, num_queries, embed_dims).
            query_pos (Tensor): (bs, num_queries, embed_dims).
            memory (Tensor): (bs, num_keys, embed_dims), encoder output.
            memory_mask (Tensor, optional): (bs, num_keys) bool, True at
                padding.
            reference_points (Tensor): (bs, num_queries, num_levels, 2 or 4),
                normalised points or boxes, already scaled per level.
            spatial_shapes (Tensor): (num_levels, 2), (h, w) per level.
            level_start_index (Tensor): (num_levels,).

        Returns:
            Tensor: (bs, num_queries, embed_dims).
        """
        attended = self_attend(self.self_attn, query, query_pos)
        query = self.self_attn_norm(query + self.self_attn_dropout(attended))
        query = self.cross_attn(
            query=query,
            value=memory,
            query_pos=query_pos,
            key_padding_mask=memory_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index)
        query = self.cross_attn_norm(query)
        return self.ffn_norm(self.ffn(query))


class DeformableDetrDecoder(BaseModule):
    """A stack of :class:`DeformableDetrDecoderLayer` returning every layer.

    Args:
        num_layers (int): Number of layers. Defaults to 6.
        layer_cfg (dict): Arguments of every layer.
        return_intermediate (bool): Must be True: the head supervises every
            layer. Accepted so mmdet-style configs work. Defaults to True.
        post_norm_cfg (dict, optional): Must be None: Deformable DETR has no
            final norm. Accepted so mmdet-style configs work.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 num_layers: int = 6,
                 layer_cfg: Optional[dict] = None,
                 return_intermediate: bool = True,
                 post_norm_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not return_intermediate or post_norm_cfg is not None:
            raise ValueError(
                'DeformableDetrDecoder always returns every layer\'s output '
                'and has no final norm; set return_intermediate=True and '
                f'post_norm_cfg=None (got {return_intermediate} and '
                f'{post_norm_cfg}).')
        layer_cfg = layer_cfg or dict(
            self_attn_cfg=dict(embed_dims=256, num_heads=8, dropout=0.1),
            cross_attn_cfg=dict(),
            ffn_cfg=dict(ffn_drop=0.1))
        self.layers = nn.ModuleList([
            DeformableDetrDecoderLayer(**layer_cfg) for _ in range(num_layers)
        ])
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].embed_dims
        self.num_levels = self.layers[0].cross_attn.num_levels

    def forward(
            self,
            query: Tensor,
            query_pos: Tensor,
            memory: Tensor,
            memory_mask: Optional[Tensor],
            reference_points: Tensor,
            spatial_shapes: Tensor,
            level_start_index: Tensor,
            valid_ratios: Tensor,
            reg_branches: Optional[nn.ModuleList] = None
    ) -> Tuple[Tensor, Tensor]:
        """Run every layer, refining the references if asked.

        Args:
            query (Tensor): (bs, num_queries, embed_dims).
            query_pos (Tensor): (bs, num_queries, embed_dims).
            memory (Tensor): (bs, num_keys, embed_dims).
            memory_mask (Tensor, optional): (bs, num_keys) bool, True at
                padding.
            reference_points (Tensor): (bs, num_queries, 2) normalised
                (x, y), or (bs, num_queries, 4) normalised (cx, cy, w, h) in
                two-stage mode; relative to each image's valid area.
            spatial_shapes (Tensor): (num_levels, 2), (h, w) per level.
            level_start_index (Tensor): (num_levels,).
            valid_ratios (Tensor): (bs, num_levels, 2), (w, h) fractions.
            reg_branches (nn.ModuleList, optional): One regression branch per
                layer mapping (bs, num_queries, embed_dims) to
                (bs, num_queries, 4) box deltas in logit space; given only
                with box refinement.

        Returns:
            tuple[Tensor, Tensor]: Hidden states
            (num_layers, bs, num_queries, embed_dims) and the references
            after every layer (num_layers, bs, num_queries, 2 or 4).
        """
        # Boxes scale both their centre and their size per level; points
        # become boxes after the first refinement.
        box_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        point_scale = valid_ratios[:, None]
        hidden_states, references = [], []
        for index, layer in enumerate(self.layers):
            level_scale = box_scale if reference_points.shape[-1] == 4 \
                else point_scale
            query = layer(query, query_pos, memory, memory_mask,
                          reference_points[:, :, None] * level_scale,
                          spatial_shapes, level_start_index)
            if reg_branches is not None:
                reference_points = self._refine(reg_branches[index](query),
                                                reference_points)
            hidden_states.append(query)
            references.append(reference_points)
        return torch.stack(hidden_states), torch.stack(references)

    @staticmethod
    def _refine(deltas: Tensor, reference_points: Tensor) -> Tensor:
        """Move the references by predicted deltas in logit space.

        Args:
            deltas (Tensor): (bs, num_queries, 4) logit-space box deltas.
            reference_points (Tensor): (bs, num_queries, 2 or 4), normalised.

        Returns:
            Tensor: (bs, num_queries, 4) normalised boxes, detached: the
            next layer's gradient must not flow into this layer's
            regression branch through the references, as in the paper.
        """
        if reference_points.shape[-1] == 4:
            refined = deltas + inverse_sigmoid(reference_points)
        else:
            refined = torch.cat(
                (deltas[..., :2] + inverse_sigmoid(reference_points),
                 deltas[..., 2:]), -1)
        return refined.sigmoid().detach()
