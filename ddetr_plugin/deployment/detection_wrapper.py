"""The detector as a tensor function: images in, detections out.

MMDetection's ``predict`` takes data samples and returns them filled;
exporters need tensors in and tensors out. :class:`TensorDetector` runs the
same stages as ``DeformableDETR.predict`` on a batch of unpadded images and
returns the detections in the convention MMDeploy users know:

- ``dets``: (bs, max_per_img, 5) float32, (x1, y1, x2, y2, score) in pixels
  of the input tensor, sorted by score;
- ``labels``: (bs, max_per_img) int64.

It wraps the detector from outside, so any ``DeformableDETR`` works
unchanged.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


def decode_detections(cls_scores: Tensor, bbox_preds: Tensor, max_per_img: int,
                      height: int, width: int) -> Tuple[Tensor, Tensor]:
    """Top-scoring (query, class) pairs as pixel boxes, batched.

    The same ranking, box conversion and clamping as the head's
    ``predict_by_feat`` without rescaling, for all images at once.

    Args:
        cls_scores (Tensor): (bs, num_queries, num_classes) logits of the
            last decoder layer.
        bbox_preds (Tensor): (bs, num_queries, 4) normalised (cx, cy, w, h).
        max_per_img (int): Detections kept per image.
        height (int): Image height in pixels (symbolic under export).
        width (int): Image width in pixels.

    Returns:
        tuple[Tensor, Tensor]: ``dets`` (bs, k, 5) and ``labels`` (bs, k),
        k = min(max_per_img, num_queries * num_classes).
    """
    _, num_queries, num_classes = cls_scores.shape
    num_kept = min(max_per_img, num_queries * num_classes)
    # A query may detect several classes: rank all (query, class) pairs.
    scores, pair_indices = cls_scores.sigmoid().flatten(1).topk(
        num_kept, dim=1)
    labels = pair_indices % num_classes
    query_indices = pair_indices // num_classes
    boxes = bbox_preds.gather(1, query_indices[..., None].expand(-1, -1, 4))
    centre_x, centre_y, box_width, box_height = boxes.split(1, dim=-1)
    # Same arithmetic as mmdet's bbox_cxcywh_to_xyxy, then pixels.
    x1 = ((centre_x - 0.5 * box_width) * width).clamp(min=0, max=width)
    y1 = ((centre_y - 0.5 * box_height) * height).clamp(min=0, max=height)
    x2 = ((centre_x + 0.5 * box_width) * width).clamp(min=0, max=width)
    y2 = ((centre_y + 0.5 * box_height) * height).clamp(min=0, max=height)
    dets = torch.cat((x1, y1, x2, y2, scores[..., None]), -1)
    return dets, labels


class TensorDetector(nn.Module):
    """``DeformableDETR`` from a normalised image batch to ``dets, labels``.

    The images must be unpadded (all of the batch's own size): the export
    has no padding mask, so padding would be read as image content.

    Args:
        detector (nn.Module): A ``DeformableDETR`` (``extract_feat``,
            ``run_transformer`` and ``bbox_head``), in eval mode.
        max_per_img (int, optional): Detections per image; defaults to the
            head's ``test_cfg.max_per_img`` (100 when unset).
    """

    def __init__(self,
                 detector: nn.Module,
                 max_per_img: Optional[int] = None) -> None:
        super().__init__()
        missing = [
            name for name in ('extract_feat', 'run_transformer', 'bbox_head')
            if not hasattr(detector, name)
        ]
        if missing:
            raise TypeError(
                'TensorDetector wraps a ddetr_plugin DeformableDETR; '
                f'{type(detector).__name__} lacks {missing}. Build the model '
                'from a config whose model.type is DeformableDETR with '
                "default_scope='ddetr_plugin'.")
        self.detector = detector
        test_cfg = detector.bbox_head.test_cfg or {}
        self.max_per_img = int(max_per_img or test_cfg.get('max_per_img', 100))

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        """Detections of a batch of unpadded images.

        Args:
            images (Tensor): (bs, 3, h, w) float32, normalised as the
                config's data preprocessor does.

        Returns:
            tuple[Tensor, Tensor]: ``dets`` (bs, max_per_img, 5) as (x1, y1,
            x2, y2, score) in pixels of ``images``, sorted by score, and
            ``labels`` (bs, max_per_img) int64.
        """
        detector = self.detector
        # No data samples: no image is padded, so there is no mask.
        head_inputs = detector.run_transformer(
            detector.extract_feat(images), None)
        # The head picks each layer's prediction branches by its index, so
        # it runs on all layers and the last one is kept.
        all_cls_scores, all_bbox_preds = detector.bbox_head(
            head_inputs['hidden_states'], head_inputs['references'])
        return decode_detections(all_cls_scores[-1], all_bbox_preds[-1],
                                 self.max_per_img, images.shape[-2],
                                 images.shape[-1])
