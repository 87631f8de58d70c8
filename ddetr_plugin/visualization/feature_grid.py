"""From a cell of the padded batch's feature map to original-image pixels.

A DETR's encoder memory is one feature map of ``h x w`` cells over the
padded batch input (``batch_input_shape``); the model's padding mask
treats cell ``(row, column)`` as covering input pixels
``[column, column + 1) * W / w`` by ``[row, row + 1) * H / h``. The
test-time resize is undone by dividing by ``scale_factor``, as the head
rescales its boxes, so a map over the cells lands on the original image
where the detections are drawn, whatever the padding and aspect ratio.

Shape shorthand: ``h, w`` cells of the feature map, ``num_keys = h * w``.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


class FeatureGrid(NamedTuple):
    """Where the feature map's cells lie in the original image.

    Attributes:
        feature_shape (tuple[int, int]): (h, w) cells.
        cell_size (Tensor): (2,) float64, (width, height) of one cell in
            original-image pixels.
        ori_shape (tuple[int, int]): (height, width) of the original image.
    """
    feature_shape: Tuple[int, int]
    cell_size: Tensor
    ori_shape: Tuple[int, int]


def feature_grid(feature_shape: Tuple[int, int], meta: dict) -> FeatureGrid:
    """The grid of a feature map of one image of a batch.

    Args:
        feature_shape (tuple[int, int]): (h, w) of the map.
        meta (dict): The image's meta with ``batch_input_shape`` (h, w) of
            the padded batch, ``scale_factor`` (w_scale, h_scale) of the
            test-time resize and ``ori_shape`` (h, w).

    Returns:
        FeatureGrid: The grid.
    """
    for key in ('batch_input_shape', 'scale_factor', 'ori_shape'):
        if meta.get(key) is None:
            raise KeyError(
                f'the image meta needs {key!r} to map the feature map to '
                f'the original image; meta keys: {sorted(meta)}')
    height, width = (int(size) for size in feature_shape)
    padded_height, padded_width = meta['batch_input_shape'][:2]
    scale_x, scale_y = meta['scale_factor'][:2]
    cell_size = torch.tensor(
        [padded_width / width / scale_x, padded_height / height / scale_y],
        dtype=torch.float64)
    ori_height, ori_width = meta['ori_shape'][:2]
    return FeatureGrid((height, width), cell_size,
                       (int(ori_height), int(ori_width)))


def cell_centres(grid: FeatureGrid) -> Tensor:
    """The centre of every cell, in original-image pixels.

    Returns:
        Tensor: (num_keys, 2) float64 (x, y), cells row by row as the
        memory flattens them.
    """
    height, width = grid.feature_shape
    rows, columns = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing='ij')
    centres = torch.stack((columns + 0.5, rows + 0.5), -1).view(-1, 2)
    return centres * grid.cell_size


def peaks(maps: Tensor, grid: FeatureGrid) -> Tuple[Tensor, Tensor]:
    """Where each map is largest, in original-image pixels.

    Args:
        maps (Tensor): (..., num_keys) weights over the cells.
        grid (FeatureGrid): The map's grid.

    Returns:
        tuple[Tensor, Tensor]: ``locations`` (..., 2) float64 (x, y), the
        centre of the heaviest cell, and its ``weights`` (...).
    """
    weights, indices = maps.max(-1)
    return cell_centres(grid)[indices.cpu()], weights


def upsample(maps: Tensor, grid: FeatureGrid) -> Tensor:
    """Maps over the cells, resampled at every original-image pixel.

    Each pixel's centre is placed on the feature map (through the resize
    and into the padded batch's cells) and the map is read there by
    bilinear interpolation between cell centres; pixels outside the image
    (the padding) are never sampled.

    Args:
        maps (Tensor): (n, h, w) weights over the cells.
        grid (FeatureGrid): The maps' grid.

    Returns:
        Tensor: (n, ori_height, ori_width) float32.
    """
    height, width = grid.feature_shape
    ori_height, ori_width = grid.ori_shape
    # Pixel centre -> position in cells; grid_sample (align_corners False)
    # reads cell i's value at normalised (2 * (i + 0.5) / w - 1).
    xs = (torch.arange(ori_width, dtype=torch.float64) + 0.5) / \
        grid.cell_size[0] / width * 2 - 1
    ys = (torch.arange(ori_height, dtype=torch.float64) + 0.5) / \
        grid.cell_size[1] / height * 2 - 1
    sample_y, sample_x = torch.meshgrid(ys, xs, indexing='ij')
    sample = torch.stack((sample_x, sample_y), -1)[None].float()
    values = maps.detach().cpu().float()[:, None]
    return F.grid_sample(
        values,
        sample.expand(len(values), -1, -1, -1),
        mode='bilinear',
        padding_mode='border',
        align_corners=False)[:, 0]
