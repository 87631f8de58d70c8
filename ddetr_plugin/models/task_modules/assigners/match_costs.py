"""Pairwise matching costs between query predictions and ground truth.

Each cost is a callable with MMDetection's match-cost contract: it takes
the predictions of one image (``InstanceData`` with ``scores`` logits and
``bboxes`` in absolute (x1, y1, x2, y2) pixels), the ground truth of that
image (``labels`` and absolute ``bboxes``) and the image meta, and returns a
``(num_preds, num_gts)`` matrix, already multiplied by its ``weight``. The
Hungarian assigner sums them and finds the cheapest one-to-one matching.

Names and arguments follow MMDetection's so that an MMDetection config's
``match_costs`` builds these classes unchanged in the ``ddetr_plugin`` scope.
"""
from typing import Optional, Union

import torch
from mmdet.structures.bbox import bbox_overlaps, bbox_xyxy_to_cxcywh
from mmengine.structures import InstanceData
from torch import Tensor

from ddetr_plugin.registry import TASK_UTILS


class MatchCost:
    """Base of the match costs: holds the weight and checks the inputs.

    Args:
        weight (float): Factor the cost matrix is multiplied by.
            Defaults to 1.
    """

    def __init__(self, weight: Union[float, int] = 1.) -> None:
        if not isinstance(weight, (int, float)):
            raise TypeError(f'{type(self).__name__}: weight must be a '
                            f'number, got {type(weight).__name__}')
        self.weight = weight

    def __call__(self,
                 pred_instances: InstanceData,
                 gt_instances: InstanceData,
                 img_meta: Optional[dict] = None,
                 **kwargs) -> Tensor:
        """Compute the weighted cost of matching every prediction with
        every ground-truth instance.

        Args:
            pred_instances (InstanceData): Predictions of one image;
                ``scores`` (num_preds, num_classes) logits and ``bboxes``
                (num_preds, 4) absolute (x1, y1, x2, y2).
            gt_instances (InstanceData): Ground truth of the image;
                ``labels`` (num_gts,) and ``bboxes`` (num_gts, 4) absolute
                (x1, y1, x2, y2).
            img_meta (dict, optional): Meta of the image; ``img_shape``
                (height, width) is used by costs that normalise boxes.

        Returns:
            Tensor: (num_preds, num_gts) weighted cost.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f'{type(self).__name__}(weight={self.weight})'


def _image_size_factor(img_meta: Optional[dict], reference: Tensor,
                       cost_name: str) -> Tensor:
    """(1, 4) tensor (width, height, width, height) of the image."""
    if img_meta is None or 'img_shape' not in img_meta:
        raise KeyError(f'{cost_name} normalises boxes by the image size and '
                       "needs img_meta['img_shape'] = (height, width); got "
                       f'img_meta={img_meta!r}')
    height, width = img_meta['img_shape'][:2]
    return reference.new_tensor([width, height, width, height]).unsqueeze(0)


@TASK_UTILS.register_module()
class FocalLossCost(MatchCost):
    """Sigmoid focal-loss cost of labelling a prediction with a class.

    For each (prediction, ground truth) pair the cost is the focal loss of
    calling the prediction positive for the ground truth's class minus the
    focal loss of calling it negative for that class, so a query is only
    rewarded for the class it is matched to, as in Deformable DETR.

    Args:
        alpha (float): Balance between positives and negatives.
            Defaults to 0.25.
        gamma (float): Focusing exponent. Defaults to 2.
        eps (float): Added inside the logarithms so that a saturated
            probability gives a large finite cost. Defaults to 1e-12.
        weight (float): Factor of the cost. Defaults to 1.
    """

    def __init__(self,
                 alpha: Union[float, int] = 0.25,
                 gamma: Union[float, int] = 2,
                 eps: float = 1e-12,
                 weight: Union[float, int] = 1.,
                 binary_input: bool = False) -> None:
        super().__init__(weight=weight)
        if binary_input:
            raise NotImplementedError(
                'FocalLossCost of the ddetr_plugin scope matches boxes by '
                'class label only; binary_input=True (mask matching) is not '
                'supported, use mmdet.FocalLossCost for it')
        self.alpha = alpha
        self.gamma = gamma
        self.eps = eps

    def __call__(self,
                 pred_instances: InstanceData,
                 gt_instances: InstanceData,
                 img_meta: Optional[dict] = None,
                 **kwargs) -> Tensor:
        """See :meth:`MatchCost.__call__`; uses ``scores`` and ``labels``."""
        logits = pred_instances.scores
        labels = gt_instances.labels
        if logits.dim() != 2:
            raise ValueError('FocalLossCost expects scores of shape '
                             '(num_preds, num_classes), got '
                             f'{tuple(logits.shape)}')
        # Only the columns of the ground-truth classes are ever needed.
        probs = logits[:, labels].sigmoid()
        positive_cost = -(probs + self.eps).log() * (
            self.alpha * (1 - probs).pow(self.gamma))
        negative_cost = -(1 - probs + self.eps).log() * (
            (1 - self.alpha) * probs.pow(self.gamma))
        return (positive_cost - negative_cost) * self.weight

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(alpha={self.alpha}, '
                f'gamma={self.gamma}, weight={self.weight})')


@TASK_UTILS.register_module()
class BBoxL1Cost(MatchCost):
    """L1 distance between boxes normalised by the image size.

    Args:
        box_format (str): ``'xywh'`` compares (cx, cy, w, h), as Deformable
            DETR does; ``'xyxy'`` compares corners. Defaults to ``'xyxy'``,
            MMDetection's default, so that configs behave the same.
        weight (float): Factor of the cost. Defaults to 1.
    """

    def __init__(self,
                 box_format: str = 'xyxy',
                 weight: Union[float, int] = 1.) -> None:
        super().__init__(weight=weight)
        if box_format not in ('xyxy', 'xywh'):
            raise ValueError("BBoxL1Cost box_format must be 'xyxy' or "
                             f"'xywh', got {box_format!r}")
        self.box_format = box_format

    def __call__(self,
                 pred_instances: InstanceData,
                 gt_instances: InstanceData,
                 img_meta: Optional[dict] = None,
                 **kwargs) -> Tensor:
        """See :meth:`MatchCost.__call__`; uses ``bboxes`` and
        ``img_meta['img_shape']``."""
        pred_boxes = pred_instances.bboxes
        gt_boxes = gt_instances.bboxes
        if self.box_format == 'xywh':
            pred_boxes = bbox_xyxy_to_cxcywh(pred_boxes)
            gt_boxes = bbox_xyxy_to_cxcywh(gt_boxes)
        factor = _image_size_factor(img_meta, gt_boxes, 'BBoxL1Cost')
        dtype = pred_boxes.dtype
        pred_boxes, gt_boxes = pred_boxes / factor, gt_boxes / factor
        # torch.cdist has no half-precision kernel outside autocast.
        if dtype in (torch.float16, torch.bfloat16):
            pred_boxes, gt_boxes = pred_boxes.float(), gt_boxes.float()
        distance = torch.cdist(pred_boxes, gt_boxes, p=1).to(dtype)
        return distance * self.weight

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(box_format={self.box_format!r}, '
                f'weight={self.weight})')


@TASK_UTILS.register_module()
class IoUCost(MatchCost):
    """Negative (generalised) IoU between predicted and ground-truth boxes.

    The ``1 -`` of the usual IoU loss is left out: a constant shift of every
    entry does not change which matching is cheapest.

    Args:
        iou_mode (str): ``'giou'`` (Deformable DETR), ``'iou'`` or ``'iof'``.
            Defaults to ``'giou'``.
        weight (float): Factor of the cost. Defaults to 1.
    """

    def __init__(self,
                 iou_mode: str = 'giou',
                 weight: Union[float, int] = 1.) -> None:
        super().__init__(weight=weight)
        if iou_mode not in ('iou', 'iof', 'giou'):
            raise ValueError("IoUCost iou_mode must be 'iou', 'iof' or "
                             f"'giou', got {iou_mode!r}")
        self.iou_mode = iou_mode

    def __call__(self,
                 pred_instances: InstanceData,
                 gt_instances: InstanceData,
                 img_meta: Optional[dict] = None,
                 **kwargs) -> Tensor:
        """See :meth:`MatchCost.__call__`; uses ``bboxes``."""
        pred_boxes = pred_instances.bboxes
        gt_boxes = gt_instances.bboxes
        dtype = pred_boxes.dtype
        # Areas of boxes in pixels overflow float16.
        if dtype == torch.float16:
            pred_boxes = pred_boxes.float()
            gt_boxes = gt_boxes.float()
        overlaps = bbox_overlaps(
            pred_boxes, gt_boxes, mode=self.iou_mode, is_aligned=False)
        return -overlaps.to(dtype) * self.weight

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(iou_mode={self.iou_mode!r}, '
                f'weight={self.weight})')
