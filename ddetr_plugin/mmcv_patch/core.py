"""The sampling core of mmcv's attention, served by the plugin's op.

mmcv 2.x's ``MultiScaleDeformableAttention.forward`` projects the value,
computes the sampling locations and the attention weights with its own
layers, and then hands the sampling to one of two names it reads from its
module, ``mmcv.ops.multi_scale_deform_attn``:

- ``MultiScaleDeformableAttnFunction.apply(value, spatial_shapes,
  level_start_index, sampling_locations, attention_weights, im2col_step)``
  for CUDA tensors (mmcv's CUDA kernel);
- ``multi_scale_deformable_attn_pytorch(value, spatial_shapes,
  sampling_locations, attention_weights)`` for every other device
  (``grid_sample`` level by level).

The two stand-ins here take exactly those arguments and call the plugin's
``ms_deform_attn`` (compiled CPU and CUDA kernels, float32 accumulation,
autograd and fake kernels registered with ``torch.library``). Both compute
what mmcv's functions compute: bilinear sampling with zero padding and
``align_corners=False``, weighted by the attention weights.

Shape shorthand: bs batch, num_keys sum of h * w over the levels,
num_queries queries, num_heads heads, head_dims channels per head,
num_levels levels, num_points points per level.
"""
import torch
from torch import Tensor

from ..ops import ms_deform_attn

_HALF_TYPES = (torch.float16, torch.bfloat16)


def level_start_index_of(spatial_shapes: Tensor) -> Tensor:
    """Offset of each level in the flattened keys.

    Args:
        spatial_shapes (Tensor): (num_levels, 2), integer (h, w) per level.

    Returns:
        Tensor: (num_levels,), the exclusive cumulative sum of h * w.
    """
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return sizes.cumsum(0) - sizes


def _sampling_inputs_dtype(value: Tensor, sampling_locations: Tensor):
    """The dtype the locations and weights are given to the op in.

    mmcv casts them to the value's dtype (a float32 model under autocast
    may hand a half value with float32 locations, or the reverse). The
    plugin's op reads float32 locations beside a half value, which keeps
    sub-pixel precision on large maps, and otherwise wants one dtype.
    """
    if (value.dtype in _HALF_TYPES
            and sampling_locations.dtype not in _HALF_TYPES):
        return sampling_locations.dtype
    return value.dtype


def _sample(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
            sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """``ms_deform_attn`` with the locations and weights in the op's dtype.
    """
    dtype = _sampling_inputs_dtype(value, sampling_locations)
    return ms_deform_attn(value, spatial_shapes, level_start_index,
                          sampling_locations.to(dtype),
                          attention_weights.to(dtype))


def plugin_sampling_without_start_index(value: Tensor,
                                        value_spatial_shapes: Tensor,
                                        sampling_locations: Tensor,
                                        attention_weights: Tensor) -> Tensor:
    """Stands in for mmcv's ``multi_scale_deformable_attn_pytorch``.

    Args:
        value (Tensor): (bs, num_keys, num_heads, head_dims).
        value_spatial_shapes (Tensor): (num_levels, 2), integer (h, w) of
            each level, packed level after level in num_keys.
        sampling_locations (Tensor): (bs, num_queries, num_heads,
            num_levels, num_points, 2), normalised (x, y) in [0, 1].
        attention_weights (Tensor): (bs, num_queries, num_heads, num_levels,
            num_points).

    Returns:
        Tensor: (bs, num_queries, num_heads * head_dims).
    """
    # mmcv's signature has no level_start_index: the levels are packed, so
    # it follows from the level sizes.
    return _sample(value, value_spatial_shapes,
                   level_start_index_of(value_spatial_shapes),
                   sampling_locations, attention_weights)


class PluginSamplingFunction:
    """Stands in for mmcv's ``MultiScaleDeformableAttnFunction``.

    mmcv's module only calls its ``apply``; the plugin's op brings its own
    autograd formula, so this is no ``torch.autograd.Function``.
    """

    @staticmethod
    def apply(value: Tensor, value_spatial_shapes: Tensor,
              value_level_start_index: Tensor, sampling_locations: Tensor,
              attention_weights: Tensor, im2col_step: int) -> Tensor:
        """The sampling of mmcv's CUDA path.

        Args:
            value (Tensor): (bs, num_keys, num_heads, head_dims).
            value_spatial_shapes (Tensor): (num_levels, 2), integer (h, w).
            value_level_start_index (Tensor): (num_levels,), offset of each
                level in num_keys.
            sampling_locations (Tensor): (bs, num_queries, num_heads,
                num_levels, num_points, 2), normalised (x, y) in [0, 1].
            attention_weights (Tensor): (bs, num_queries, num_heads,
                num_levels, num_points).
            im2col_step (int): unused: mmcv's kernel works through the
                batch in chunks of this many images; the plugin's kernels
                need no chunks.

        Returns:
            Tensor: (bs, num_queries, num_heads * head_dims).
        """
        return _sample(value, value_spatial_shapes, value_level_start_index,
                       sampling_locations, attention_weights)
