"""Multi-scale deformable attention, the module around the plugin's op.

Each query looks at ``num_points`` locations per head and per feature level,
placed around its reference point by learned offsets, and mixes what it reads
there with learned, softmax-normalised weights. The sampling itself is
``ddetr_plugin.ops.ms_deform_attn``; this module computes the offsets, the
weights and the projections around it.

Parameter and constructor names follow mmcv's ``MultiScaleDeformableAttention``
so that weights trained with mmcv load unchanged.
"""
import math
import warnings
from typing import Optional

import torch
from mmengine.model import BaseModule
from torch import Tensor, nn

from ddetr_plugin.ops import ms_deform_attn
from ddetr_plugin.registry import MODELS


@MODELS.register_module()
class MultiScaleDeformableAttention(BaseModule):
    """Deformable attention over several feature levels.

    Args:
        embed_dims (int): Channels of queries and values. Defaults to 256.
        num_heads (int): Attention heads; must divide ``embed_dims``.
            Defaults to 8.
        num_levels (int): Feature levels the values come from. Defaults to 4.
        num_points (int): Sampling points per head and per level.
            Defaults to 4.
        im2col_step (int): Accepted for compatibility with mmcv's configs and
            ignored: the plugin's op needs no batching step. Defaults to 64.
        dropout (float): Dropout on the attention output before the identity
            shortcut is added. Defaults to 0.1.
        batch_first (bool): Whether queries and values are (bs, n, dims)
            rather than (n, bs, dims). Defaults to False, as in mmcv.
        norm_cfg (dict, optional): Accepted for compatibility with mmcv's
            configs; mmcv stores it without using it, and so does this
            module. Defaults to None.
        value_proj_ratio (float): Channels of the projected values relative
            to ``embed_dims``. Defaults to 1.0.
        init_cfg (dict, optional): Initialisation config. Defaults to None.
    """

    def __init__(self,
                 embed_dims: int = 256,
                 num_heads: int = 8,
                 num_levels: int = 4,
                 num_points: int = 4,
                 im2col_step: int = 64,
                 dropout: float = 0.1,
                 batch_first: bool = False,
                 norm_cfg: Optional[dict] = None,
                 value_proj_ratio: float = 1.0,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        value_dims = int(embed_dims * value_proj_ratio)
        if embed_dims % num_heads != 0 or value_dims % num_heads != 0:
            raise ValueError(
                'MultiScaleDeformableAttention: embed_dims (and embed_dims * '
                'value_proj_ratio) must be divisible by num_heads, got '
                f'embed_dims={embed_dims}, value_proj_ratio='
                f'{value_proj_ratio}, num_heads={num_heads}.')
        head_dims = value_dims // num_heads
        if head_dims & (head_dims - 1) != 0:
            # Not an error: the kernels are simply fastest for powers of 2.
            warnings.warn(
                'MultiScaleDeformableAttention runs fastest when the '
                'channels per head are a power of 2; got '
                f'{head_dims}.')
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = im2col_step
        self.batch_first = batch_first
        self.norm_cfg = norm_cfg
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(
            embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims,
                                           num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_dims)
        self.output_proj = nn.Linear(value_dims, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """The paper's initialisation.

        Every head starts looking in its own direction (evenly spread over
        the circle, scaled so the larger coordinate is 1), the k-th point at
        k times that offset, and all samples weigh the same.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(
            self.num_heads,
            dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        # (num_heads, num_levels, num_points, 2): radius grows with the point
        radii = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        offsets = directions[:, None, None, :] * radii[None, None, :, None]
        offsets = offsets.expand(-1, self.num_levels, -1, -1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)
        self._is_init = True

    def forward(self,
                query: Tensor,
                key: Optional[Tensor] = None,
                value: Optional[Tensor] = None,
                identity: Optional[Tensor] = None,
                query_pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None,
                reference_points: Optional[Tensor] = None,
                spatial_shapes: Optional[Tensor] = None,
                level_start_index: Optional[Tensor] = None,
                **kwargs) -> Tensor:
        """Attend from every query to its sampling points.

        Shapes are given for ``batch_first=True``; otherwise the first two
        axes of ``query``, ``value`` and the result are swapped.

        Args:
            query (Tensor): (bs, num_queries, embed_dims).
            key (Tensor, optional): Unused; deformable attention has no keys.
                Accepted so mmcv-style layers can call it.
            value (Tensor, optional): (bs, num_values, embed_dims), all levels
                flattened level after level. Defaults to ``query``.
            identity (Tensor, optional): (bs, num_queries, embed_dims), added
                to the output. Defaults to ``query`` (before ``query_pos``).
            query_pos (Tensor, optional): (bs, num_queries, embed_dims),
                added to ``query`` before predicting offsets and weights.
            key_padding_mask (Tensor, optional): (bs, num_values) bool, True
                at padded positions, whose values are zeroed.
            reference_points (Tensor): (bs, num_queries, num_levels, 2)
                normalised (x, y) points, or (bs, num_queries, num_levels, 4)
                normalised (cx, cy, w, h) boxes whose size scales the offsets.
            spatial_shapes (Tensor): (num_levels, 2) int64, (h, w) per level.
            level_start_index (Tensor): (num_levels,) int64, offset of each
                level in ``num_values``.

        Returns:
            Tensor: (bs, num_queries, embed_dims).
        """
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.transpose(0, 1)
            value = value.transpose(0, 1)
        self._check_inputs(query, value, reference_points, spatial_shapes,
                           level_start_index)
        batch_size, num_queries, _ = query.shape
        num_values = value.shape[1]

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(batch_size, num_values, self.num_heads, -1)

        attention_weights = self._attention_weights(query)
        sampling_locations = self._sampling_locations(query, reference_points,
                                                      spatial_shapes)

        output = ms_deform_attn(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights)
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.transpose(0, 1)
        return self.dropout(output) + identity

    def _attention_weights(self, query: Tensor) -> Tensor:
        """Predict the weight of every sampling point.

        Args:
            query (Tensor): (bs, num_queries, embed_dims), with positions.

        Returns:
            Tensor: (bs, num_queries, num_heads, num_levels, num_points);
            the weights of a head sum to 1 over its levels and points.
        """
        batch_size, num_queries, _ = query.shape
        # One softmax over all levels and points of a head.
        return self.attention_weights(query).view(
            batch_size, num_queries, self.num_heads,
            self.num_levels * self.num_points).softmax(-1).view(
                batch_size, num_queries, self.num_heads, self.num_levels,
                self.num_points)

    def _sampling_locations(self, query: Tensor, reference_points: Tensor,
                            spatial_shapes: Tensor) -> Tensor:
        """Predict the offsets and place the sampling points.

        Args:
            query (Tensor): (bs, num_queries, embed_dims), with positions.
            reference_points (Tensor): (bs, num_queries, num_levels, 2 or 4).
            spatial_shapes (Tensor): (num_levels, 2), (h, w) per level.

        Returns:
            Tensor: (bs, num_queries, num_heads, num_levels, num_points, 2),
            normalised (x, y).
        """
        batch_size, num_queries, _ = query.shape
        shape = (batch_size, num_queries, self.num_heads, self.num_levels,
                 self.num_points, 2)
        if reference_points.shape[-1] == 4:
            # Boxes: offsets are in units of half the box, spread over the
            # points.
            references = reference_points[:, :, None, :, None, :]
            offsets = self.sampling_offsets(query).view(shape)
            return references[..., :2] + offsets / self.num_points * \
                references[..., 2:] * 0.5
        # Points: offsets are in pixels of each level. Dividing the linear
        # layer's rows by the level sizes gives normalised offsets in one
        # matrix product, instead of a broadcast division over every
        # sampling point (as costly as the sampling itself on CPU).
        level_sizes = spatial_shapes.flip(-1).to(query.dtype)
        row_scale = level_sizes.reciprocal()[None, :, None, :].expand(
            self.num_heads, -1, self.num_points, -1).reshape(-1)
        offsets = nn.functional.linear(
            query, self.sampling_offsets.weight * row_scale[:, None],
            self.sampling_offsets.bias * row_scale)
        # The same (x, y) for all heads and points of a level: broadcast
        # over heads only, with contiguous rows of num_levels * num_points
        # * 2 values.
        references = reference_points[:, :, :, None, :].expand(
            -1, -1, -1, self.num_points, -1).reshape(batch_size, num_queries,
                                                     1, -1)
        locations = offsets.view(batch_size, num_queries, self.num_heads,
                                 -1) + references
        return locations.view(shape)

    def _check_inputs(self, query: Tensor, value: Tensor,
                      reference_points: Optional[Tensor],
                      spatial_shapes: Optional[Tensor],
                      level_start_index: Optional[Tensor]) -> None:
        """Raise a ValueError naming the first inconsistent input.

        Args:
            query (Tensor): (bs, num_queries, embed_dims), batch first.
            value (Tensor): (bs, num_values, embed_dims), batch first.
            reference_points (Tensor): (bs, num_queries, num_levels, 2 or 4).
            spatial_shapes (Tensor): (num_levels, 2).
            level_start_index (Tensor): (num_levels,).
        """
        name = type(self).__name__
        if reference_points is None or spatial_shapes is None or \
                level_start_index is None:
            raise ValueError(
                f'{name} needs reference_points, spatial_shapes and '
                'level_start_index; got None for at least one of them.')
        if query.dim() != 3 or value.dim() != 3 or \
                query.shape[0] != value.shape[0]:
            raise ValueError(
                f'{name} expects query (bs, num_queries, {self.embed_dims}) '
                f'and value (bs, num_values, {self.embed_dims}) (batch '
                f'first, batch_first={self.batch_first}); got query '
                f'{tuple(query.shape)} and value {tuple(value.shape)}.')
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(
                f'{name}: the last dim of reference_points must be 2 (x, y) '
                'or 4 (cx, cy, w, h); got reference_points of shape '
                f'{tuple(reference_points.shape)}.')
        expected_references = (query.shape[0], query.shape[1], self.num_levels)
        if reference_points.dim() != 4 or \
                tuple(reference_points.shape[:3]) != expected_references:
            raise ValueError(
                f'{name} expects reference_points of shape (bs, num_queries, '
                f'num_levels, 2 or 4) = {expected_references + ("2|4", )}; '
                f'got {tuple(reference_points.shape)}.')
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or \
                spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(
                f'{name} was built with num_levels={self.num_levels}, so '
                f'spatial_shapes must be ({self.num_levels}, 2); got '
                f'{tuple(spatial_shapes.shape)}. Make num_levels of the '
                'attention equal to the number of feature levels '
                '(num_feature_levels of the detector, num_outs of the neck).')
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # The level sizes are graph values while exporting; the op's
            # own checks run on them in eager mode.
            return
        num_values = int(spatial_shapes.prod(1).sum())
        if num_values != value.shape[1]:
            raise ValueError(
                f'{name}: spatial_shapes {spatial_shapes.tolist()} cover '
                f'{num_values} positions but value has {value.shape[1]}.')
