"""Plain-PyTorch multi-scale deformable attention.

This is the single reference implementation of the op: the oracle of every
op test and the fallback wherever the compiled extension cannot run.

Shape shorthand used below:
    bs: batch size, nk: number of keys (sum of h * w over levels),
    nq: number of queries, nh: number of heads, hd: channels per head,
    nl: number of levels, np: number of sampling points per level.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(value: Tensor, spatial_shapes: Tensor,
                             level_start_index: Tensor,
                             sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention with ``grid_sample``.

    Bilinear sampling with zero padding and ``align_corners=False``: a
    location ``(x, y)`` in [0, 1] maps to pixel coordinate ``x * w - 0.5``.

    Args:
        value (Tensor): (bs, nk, nh, hd), the keys of all levels flattened
            level after level.
        spatial_shapes (Tensor): (nl, 2), (h, w) of every level.
        level_start_index (Tensor): (nl,), offset of each level in ``nk``.
            Only kept for signature parity with the compiled op; the levels
            are assumed packed, as ``spatial_shapes`` implies.
        sampling_locations (Tensor): (bs, nq, nh, nl, np, 2), normalised
            (x, y) in [0, 1]; points outside read zeros.
        attention_weights (Tensor): (bs, nq, nh, nl, np).

    Returns:
        Tensor: (bs, nq, nh * hd).
    """
    bs, _, nh, hd = value.shape
    _, nq, _, nl, np_, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_levels = value.split(sizes, dim=1)
    # grid_sample works in [-1, 1]; NaN/inf locations must read zeros like
    # any other point outside the map, so they are pushed far outside.
    grids = 2 * sampling_locations - 1
    grids = torch.nan_to_num(grids, nan=-4.0, posinf=4.0, neginf=-4.0)
    grids = grids.clamp(-4.0, 4.0)
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        # (bs, h*w, nh, hd) -> (bs*nh, hd, h, w)
        level_value = value_levels[level].flatten(2).transpose(1, 2)
        level_value = level_value.reshape(bs * nh, hd, int(h), int(w))
        # (bs, nq, nh, np, 2) -> (bs*nh, nq, np, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (bs*nh, hd, nq, np)
        sampled.append(
            F.grid_sample(
                level_value,
                level_grid,
                mode='bilinear',
                padding_mode='zeros',
                align_corners=False))
    # (bs, nq, nh, nl, np) -> (bs*nh, 1, nq, nl*np)
    weights = attention_weights.transpose(1,
                                          2).reshape(bs * nh, 1, nq, nl * np_)
    # (bs*nh, hd, nq, nl*np) weighted sum over samples -> (bs*nh, hd, nq)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    output = output.view(bs, nh * hd, nq)
    return output.transpose(1, 2).contiguous()
