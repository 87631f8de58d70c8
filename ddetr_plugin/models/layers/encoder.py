"""The Deformable DETR encoder: deformable self-attention over all levels.

Every position of every level is a query; its reference point is its own
pixel centre, from which it samples ``num_points`` locations on each level.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from .feedforward import FeedForward
from .ms_deform_attn import MultiScaleDeformableAttention

# (h, w) of every level as integers (symbolic integers under torch.export).
LevelShapes = Sequence[Tuple[int, int]]


class DeformableDetrEncoderLayer(BaseModule):
    """Deformable self-attention then a feed-forward block, each post-norm.

    Args:
        self_attn_cfg (dict): Arguments of
            :class:`MultiScaleDeformableAttention`; it always runs batch
            first here.
        ffn_cfg (dict): Arguments of :class:`FeedForward`.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 self_attn_cfg: dict,
                 ffn_cfg: dict,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.self_attn = MultiScaleDeformableAttention(
            **{
                **self_attn_cfg, 'batch_first': True
            })
        self.embed_dims = self.self_attn.embed_dims
        self.self_attn_norm = nn.LayerNorm(self.embed_dims)
        self.ffn = FeedForward(**ffn_cfg)
        self.ffn_norm = nn.LayerNorm(self.embed_dims)

    def forward(self, query: Tensor, query_pos: Tensor,
                key_padding_mask: Optional[Tensor], reference_points: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """Update every position of the flattened feature maps.

        Args:
            query (Tensor): (bs, num_keys, embed_dims), all levels flattened.
            query_pos (Tensor): (bs, num_keys, embed_dims), positional plus
                level encoding.
            key_padding_mask (Tensor, optional): (bs, num_keys) bool, True at
                padding.
            reference_points (Tensor): (bs, num_keys, num_levels, 2),
                normalised (x, y) of every position on every level.
            spatial_shapes (Tensor): (num_levels, 2), (h, w) per level.
            level_start_index (Tensor): (num_levels,).

        Returns:
            Tensor: (bs, num_keys, embed_dims).
        """
        query = self.self_attn(
            query=query,
            value=query,
            query_pos=query_pos,
            key_padding_mask=key_padding_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index)
        query = self.self_attn_norm(query)
        return self.ffn_norm(self.ffn(query))


class DeformableDetrEncoder(BaseModule):
    """A stack of :class:`DeformableDetrEncoderLayer`.

    Args:
        num_layers (int): Number of layers. Defaults to 6.
        layer_cfg (dict): Arguments of every layer.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 num_layers: int = 6,
                 layer_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        layer_cfg = layer_cfg or dict(
            self_attn_cfg=dict(), ffn_cfg=dict(ffn_drop=0.1))
        self.layers = nn.ModuleList([
            DeformableDetrEncoderLayer(**layer_cfg) for _ in range(num_layers)
        ])
        self.num_layers = num_layers
        self.embed_dims = self.layers[0].embed_dims
        self.num_levels = self.layers[0].self_attn.num_levels

    def forward(self,
                query: Tensor,
                query_pos: Tensor,
                key_padding_mask: Optional[Tensor],
                spatial_shapes: Tensor,
                level_start_index: Tensor,
                valid_ratios: Tensor,
                level_shapes: Optional[LevelShapes] = None) -> Tensor:
        """Encode the flattened multi-scale features.

        Args:
            query (Tensor): (bs, num_keys, embed_dims), all levels flattened.
            query_pos (Tensor): (bs, num_keys, embed_dims).
            key_padding_mask (Tensor, optional): (bs, num_keys) bool, True at
                padding; None when no image of the batch is padded.
            spatial_shapes (Tensor): (num_levels, 2), (h, w) per level.
            level_start_index (Tensor): (num_levels,).
            valid_ratios (Tensor): (bs, num_levels, 2), unpadded fraction
                (w, h) of each level.
            level_shapes (tuple[tuple[int, int]], optional): The same (h, w)
                as integers taken from the feature maps' shapes, which stay
                symbolic under ``torch.export``; read from
                ``spatial_shapes`` when None.

        Returns:
            Tensor: (bs, num_keys, embed_dims), the memory.
        """
        reference_points = self.reference_points(
            spatial_shapes if level_shapes is None else level_shapes,
            valid_ratios)
        for layer in self.layers:
            query = layer(query, query_pos, key_padding_mask, reference_points,
                          spatial_shapes, level_start_index)
        return query

    @staticmethod
    def reference_points(level_shapes: Union[Tensor, LevelShapes],
                         valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, as seen from every level.

        A centre is normalised by its own image's valid extent, then scaled
        by each level's valid ratio, so it lands on the same image location
        on every level despite the padding.

        Args:
            level_shapes (Tensor | tuple[tuple[int, int]]): (h, w) per level,
                as a (num_levels, 2) tensor or as integers; integers from
                the feature maps' shapes let ``torch.export`` keep the sizes
                symbolic instead of reading tensor values.
            valid_ratios (Tensor): (bs, num_levels, 2), (w, h) fractions.

        Returns:
            Tensor: (bs, num_keys, num_levels, 2), normalised (x, y).
        """
        if isinstance(level_shapes, Tensor):
            level_shapes = level_shapes.tolist()
        device = valid_ratios.device
        per_level = []
        for level, (height, width) in enumerate(level_shapes):
            # Pixel centres 0.5, 1.5, ...: arange is exact and, unlike
            # linspace, accepts a symbolic size.
            centre_y, centre_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=device) + 0.5,
                indexing='ij')
            # (bs, h * w), normalised by the image's valid extent
            centre_x = centre_x.reshape(1, -1) / (
                valid_ratios[:, None, level, 0] * width)
            centre_y = centre_y.reshape(1, -1) / (
                valid_ratios[:, None, level, 1] * height)
            per_level.append(torch.stack((centre_x, centre_y), -1))
        # (bs, num_keys, 1, 2) * (bs, 1, num_levels, 2)
        return torch.cat(per_level, 1)[:, :, None] * valid_ratios[:, None]
