"""The detector as a tensor function: images in, detections out.

MMDetection's ``predict`` takes data samples and returns them filled;
exporters need tensors in and tensors out. :class:`TensorDetector` runs the
same stages as ``predict`` of ``DeformableDETR`` and ``ConditionalDETR`` on
a padded batch of images and their sizes, and returns the detections in
the convention MMDeploy users know:

- inputs ``images`` (bs, 3, h, w) float32, padded at the bottom and right,
  and ``image_shapes`` (bs, 2) int64, the (height, width) of each image's
  unpadded part, as mmdet's ``img_shape``;
- outputs ``dets`` (bs, max_per_img, 5) float32, (x1, y1, x2, y2, score)
  in pixels of the input tensor, sorted by score, and ``labels``
  (bs, max_per_img) int64.

The padding is masked inside the model, from ``image_shapes``, as the
batched PyTorch model masks it from the data samples; so a model exported
for one size gives PyTorch's detections for every smaller image padded to
it. The wrapper holds the detector from outside, so any detector with
``extract_feat``, ``masks_of_image_shapes``, ``run_transformer(...,
masks=...)`` and a DETR-style ``bbox_head`` works unchanged.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

# What the wrapper calls on the detector.
DETECTOR_METHODS = ('extract_feat', 'masks_of_image_shapes', 'run_transformer',
                    'bbox_head')


def full_image_shapes(images: Tensor) -> Tensor:
    """``image_shapes`` of an unpadded batch: every image fills it.

    Args:
        images (Tensor): (bs, 3, h, w).

    Returns:
        Tensor: (bs, 2) int64, (h, w) in every row.
    """
    return torch.tensor(
        images.shape[-2:], dtype=torch.int64).repeat(images.shape[0], 1)


def decode_detections(cls_scores: Tensor, bbox_preds: Tensor, max_per_img: int,
                      image_shapes: Tensor) -> Tuple[Tensor, Tensor]:
    """Top-scoring (query, class) pairs as pixel boxes, batched.

    The same ranking, box conversion and clamping as the head's
    ``predict_by_feat`` without rescaling, for all images at once: boxes
    are normalised to each image's unpadded size, so that size turns them
    into pixels and bounds them.

    Args:
        cls_scores (Tensor): (bs, num_queries, num_classes) logits of the
            last decoder layer.
        bbox_preds (Tensor): (bs, num_queries, 4) normalised (cx, cy, w, h).
        max_per_img (int): Detections kept per image.
        image_shapes (Tensor): (bs, 2), (height, width) of each image's
            unpadded part in pixels.

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
    # (bs, 1, 1) each, to broadcast over (bs, k, 1).
    sizes = image_shapes.to(boxes.dtype).view(-1, 1, 2, 1)
    height, width = sizes[:, :, 0], sizes[:, :, 1]

    def pixels(normalised: Tensor, size: Tensor) -> Tensor:
        # Same arithmetic as mmdet's bbox_cxcywh_to_xyxy, then pixels
        # clamped to the image as the head does.
        return (normalised * size).clamp(min=0).minimum(size)

    x1 = pixels(centre_x - 0.5 * box_width, width)
    y1 = pixels(centre_y - 0.5 * box_height, height)
    x2 = pixels(centre_x + 0.5 * box_width, width)
    y2 = pixels(centre_y + 0.5 * box_height, height)
    dets = torch.cat((x1, y1, x2, y2, scores[..., None]), -1)
    return dets, labels


class TensorDetector(nn.Module):
    """A DETR-style detector from a padded image batch to ``dets, labels``.

    Args:
        detector (nn.Module): A ``DeformableDETR`` or ``ConditionalDETR``
            (see :data:`DETECTOR_METHODS`), in eval mode.
        max_per_img (int, optional): Detections per image; defaults to the
            head's ``test_cfg.max_per_img`` (100 when unset).
    """

    def __init__(self,
                 detector: nn.Module,
                 max_per_img: Optional[int] = None) -> None:
        super().__init__()
        missing = [
            name for name in DETECTOR_METHODS if not hasattr(detector, name)
        ]
        if missing:
            raise TypeError(
                'TensorDetector wraps a ddetr_plugin DeformableDETR or '
                f'ConditionalDETR; {type(detector).__name__} lacks '
                f'{missing}. Build the model from a config whose model.type '
                'is one of them, with model._scope_ or '
                "default_scope='ddetr_plugin'.")
        self.detector = detector
        test_cfg = detector.bbox_head.test_cfg or {}
        self.max_per_img = int(max_per_img or test_cfg.get('max_per_img', 100))

    def forward(self, images: Tensor,
                image_shapes: Tensor) -> Tuple[Tensor, Tensor]:
        """Detections of a padded batch.

        Args:
            images (Tensor): (bs, 3, h, w) float32, normalised as the
                config's data preprocessor does, each image at the top left
                and padded with zeros.
            image_shapes (Tensor): (bs, 2) int64, (height, width) of each
                image's unpadded part; :func:`full_image_shapes` for an
                unpadded batch.

        Returns:
            tuple[Tensor, Tensor]: ``dets`` (bs, max_per_img, 5) as (x1, y1,
            x2, y2, score) in pixels of ``images``, sorted by score, and
            ``labels`` (bs, max_per_img) int64.
        """
        detector = self.detector
        features = detector.extract_feat(images)
        # Always masked, even where nothing is padded: the exported graph
        # must serve padded and unpadded batches alike.
        masks = detector.masks_of_image_shapes(features, image_shapes,
                                               images.shape[-2:])
        head_inputs = detector.run_transformer(features, None, masks=masks)
        # The head picks each layer's prediction branches by its index, so
        # it runs on all layers and the last one is kept.
        all_cls_scores, all_bbox_preds = detector.bbox_head(
            head_inputs['hidden_states'], head_inputs['references'])
        return decode_detections(all_cls_scores[-1], all_bbox_preds[-1],
                                 self.max_per_img, image_shapes)
