"""Where a query of deformable attention looks, in the original image.

The attention samples every level's padded feature map at normalised
coordinates. The model puts a reference, given relative to the image's
unpadded area, onto level ``l`` by multiplying it by that level's valid
ratio (unpadded fraction of the map). Dividing by the ratio undoes this;
then the head's own scaling of its boxes (times ``img_shape``, divided by
``scale_factor``) gives pixels of the original image, so the points land
where the detections are drawn, padded batch or not.

Shape shorthand: ``num_heads``, ``num_levels`` and ``num_points`` of the
attention; ``num_queries`` and ``num_classes`` of the head.
"""
import math
from typing import NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from .attention_capture import AttentionRecord


class QueryPoints(NamedTuple):
    """The sampling of one query, in pixels of the original image.

    Attributes:
        points (Tensor): (num_heads, num_levels, num_points, 2), (x, y).
        weights (Tensor): (num_heads, num_levels, num_points); a head's
            weights sum to 1.
        reference (Tensor): (2,) the reference point (x, y), or (4,) the
            reference box (x1, y1, x2, y2) when the query's reference is a
            box (box refinement after the first layer, two-stage).
        spatial_shapes (Tensor): (num_levels, 2), (h, w) of each level.
    """
    points: Tensor
    weights: Tensor
    reference: Tensor
    spatial_shapes: Tensor


def pixels_per_unit(meta: dict) -> Tensor:
    """Original-image pixels per unit of valid-area-relative coordinates.

    Args:
        meta (dict): Image meta with ``img_shape`` (h, w) of the network
            input (before padding) and ``scale_factor`` (w_scale, h_scale)
            of the test-time resize.

    Returns:
        Tensor: (2,) float64, (width, height) of the original image as the
        head rescales its boxes.
    """
    for key in ('img_shape', 'scale_factor'):
        if meta.get(key) is None:
            raise KeyError(
                f'the image meta needs {key!r} to map points to the '
                f'original image; meta keys: {sorted(meta)}')
    height, width = meta['img_shape'][:2]
    scale_x, scale_y = meta['scale_factor'][:2]
    return torch.tensor([width / scale_x, height / scale_y],
                        dtype=torch.float64)


def query_points(record: AttentionRecord, batch_index: int, query_index: int,
                 valid_ratios: Tensor, meta: dict) -> QueryPoints:
    """One query's sampling points and weights in original-image pixels.

    Args:
        record (AttentionRecord): A captured call of the attention.
        batch_index (int): Image of the batch.
        query_index (int): Query of that call.
        valid_ratios (Tensor): (num_levels, 2), (w, h) unpadded fraction of
            each level's map for this image, as the model computed it.
        meta (dict): The image's meta, see :func:`pixels_per_unit`.

    Returns:
        QueryPoints: In pixels of the original image, on the CPU, float64.
    """
    size = pixels_per_unit(meta)
    ratios = valid_ratios.detach().cpu().to(torch.float64)
    locations = record.sampling_locations[batch_index, query_index]
    # (num_heads, num_levels, num_points, 2) / (1, num_levels, 1, 2)
    points = locations.cpu().to(torch.float64) / ratios[None, :, None, :]
    reference = record.reference_points[batch_index, query_index]
    # Every level holds the same reference scaled by its own ratio; the
    # first level's is as good as any.
    reference = reference[0].cpu().to(torch.float64)
    if reference.numel() == 4:
        centre = reference[:2] / ratios[0]
        half = reference[2:] / ratios[0] / 2
        reference = torch.cat((centre - half, centre + half)) * size.repeat(2)
    else:
        reference = reference / ratios[0] * size
    return QueryPoints(
        points=points * size,
        weights=record.attention_weights[batch_index,
                                         query_index].cpu().to(torch.float64),
        reference=reference,
        spatial_shapes=record.spatial_shapes.cpu())


def detection_queries(cls_scores: Tensor,
                      max_per_img: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The query behind each detection of the head's prediction.

    The head ranks all (query, class) pairs of the last decoder layer by
    their sigmoid score and keeps the top ``max_per_img``; this ranks them
    the same way and also returns the query of each pair.

    Args:
        cls_scores (Tensor): (num_queries, num_classes) logits of one image.
        max_per_img (int): Detections the head keeps.

    Returns:
        tuple[Tensor, Tensor, Tensor]: ``scores`` (k,), ``labels`` (k,) and
        ``query_indices`` (k,) of the kept detections, best first.
    """
    num_queries, num_classes = cls_scores.shape
    scores, pair_indices = cls_scores.sigmoid().view(-1).topk(
        min(max_per_img, num_queries * num_classes))
    return scores, pair_indices % num_classes, pair_indices // num_classes


def encoder_query_index(pixel: Sequence[float], level: int,
                        record: AttentionRecord, batch_index: int,
                        valid_ratios: Tensor, meta: dict) -> int:
    """The encoder query whose cell of ``level`` holds an image pixel.

    Args:
        pixel (Sequence[float]): (x, y) in pixels of the original image.
        level (int): Feature level of the query; negative counts from the
            last.
        record (AttentionRecord): A captured call of an encoder layer.
        batch_index (int): Image of the batch.
        valid_ratios (Tensor): (num_levels, 2), see :func:`query_points`.
        meta (dict): The image's meta, with ``ori_shape`` (h, w) too.

    Returns:
        int: Index of the query among the encoder's flattened positions.
    """
    num_levels = record.spatial_shapes.shape[0]
    if not -num_levels <= level < num_levels:
        raise ValueError(
            f'encoder level {level} is out of range: the model has '
            f'{num_levels} feature levels (0 to {num_levels - 1}, or '
            f'{-num_levels} to -1 from the last)')
    level = level % num_levels
    size = pixels_per_unit(meta)
    height, width = meta.get('ori_shape', (size[1].item(), size[0].item()))[:2]
    x, y = float(pixel[0]), float(pixel[1])
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(
            f'encoder pixel ({x:g}, {y:g}) is outside the image, which is '
            f'{width} x {height} pixels (x in [0, {width}), y in [0, '
            f'{height})); give a pixel inside it')
    map_height, map_width = record.spatial_shapes[level].tolist()
    # The encoder's reference of cell (row, column) is its centre relative
    # to the unpadded area: ((column + 0.5) / valid_width, ...).
    valid_width = max(1, round(float(valid_ratios[level, 0]) * map_width))
    valid_height = max(1, round(float(valid_ratios[level, 1]) * map_height))
    column = min(math.floor(x / float(size[0]) * valid_width), valid_width - 1)
    row = min(math.floor(y / float(size[1]) * valid_height), valid_height - 1)
    start = int(record.level_start_index[level])
    return start + row * map_width + column
