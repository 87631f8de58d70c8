"""Training side of a DETR-style head: match, build targets, compute losses.

A DETR-style decoder emits a fixed set of ``num_queries`` predictions per
image. Training matches each ground-truth box to one query with the
Hungarian assigner; matched queries learn the class and box of their ground
truth, every other query learns "no object" (an all-zero sigmoid target).
The losses are a sigmoid focal classification loss over all queries and L1
plus GIoU box losses over matched queries, each normalised by the number of
ground-truth boxes, averaged over processes in distributed training.

Shape shorthand used in this file: ``bs`` images, ``num_queries``
predictions per image, ``num_classes`` classes (no background logit).
"""
from typing import List, Optional, Tuple

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from mmdet.utils import reduce_mean
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor

from ddetr_plugin.registry import MODELS, TASK_UTILS


def image_size_factors(batch_img_metas: List[dict],
                       reference: Tensor) -> Tensor:
    """(bs, 1, 4) tensor of (width, height, width, height) per image.

    Boxes are predicted normalised by the size of the image inside the
    padded batch (``img_shape``), so that size turns them into pixels.

    Args:
        batch_img_metas (list[dict]): Meta of each image, with
            ``img_shape`` = (height, width).
        reference (Tensor): Gives the dtype and device of the result.

    Returns:
        Tensor: (bs, 1, 4) scale factors.
    """
    sizes = []
    for index, img_meta in enumerate(batch_img_metas):
        if 'img_shape' not in img_meta:
            raise KeyError(f'image {index} of the batch has no img_shape in '
                           'its meta (needed to turn normalised boxes into '
                           f'pixels); meta keys: {sorted(img_meta)}')
        height, width = img_meta['img_shape'][:2]
        sizes.append([width, height, width, height])
    return reference.new_tensor(sizes).unsqueeze(1)


class SetPredictionHead(BaseModule):
    """Base of set-prediction heads: Hungarian matching and the losses.

    Subclasses build the prediction branches and call
    :meth:`loss_of_layer` for the output of each decoder layer.

    Args:
        num_classes (int): Number of object classes (no background).
        sync_cls_avg_factor (bool): Average the classification loss's
            normaliser over processes as well. Defaults to False.
        loss_cls (dict): Config of the classification loss; it must score
            classes with sigmoids (``use_sigmoid=True``).
        loss_bbox (dict): Config of the L1 loss on normalised
            (cx, cy, w, h) boxes.
        loss_iou (dict): Config of the IoU loss on pixel (x1, y1, x2, y2)
            boxes.
        train_cfg (dict, optional): ``assigner`` config. Needed to train.
        test_cfg (dict, optional): ``max_per_img``, detections kept per
            image.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 num_classes: int,
                 sync_cls_avg_factor: bool = False,
                 loss_cls: Optional[dict] = None,
                 loss_bbox: Optional[dict] = None,
                 loss_iou: Optional[dict] = None,
                 train_cfg: Optional[dict] = None,
                 test_cfg: Optional[dict] = None,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError('num_classes must be a positive int, got '
                             f'{num_classes!r}')
        self.num_classes = num_classes
        self.sync_cls_avg_factor = sync_cls_avg_factor
        self.train_cfg = train_cfg
        self.test_cfg = test_cfg if test_cfg is not None else dict()
        self.loss_cls = MODELS.build(loss_cls)
        self.loss_bbox = MODELS.build(loss_bbox)
        self.loss_iou = MODELS.build(loss_iou)
        if not getattr(self.loss_cls, 'use_sigmoid', False):
            raise ValueError(
                f'{type(self).__name__} scores each class with a sigmoid '
                '(one logit per class, "no object" is all-negative), so '
                'loss_cls must have use_sigmoid=True (e.g. FocalLoss); got '
                f'{loss_cls!r}')
        # No background logit: "no object" is every class negative.
        self.cls_out_channels = num_classes
        if train_cfg:
            if 'assigner' not in train_cfg:
                raise KeyError(f'{type(self).__name__}: train_cfg must give '
                               'an assigner (e.g. HungarianAssigner), got '
                               f'{train_cfg!r}')
            if train_cfg.get('sampler') is not None:
                raise ValueError(
                    f'{type(self).__name__} trains every query (matched '
                    'queries as objects, the rest as background) and takes '
                    'no sampler; remove train_cfg.sampler')
            self.assigner = TASK_UTILS.build(train_cfg['assigner'])

    def _assign(self, cls_scores: Tensor, pred_boxes: Tensor,
                batch_gt_instances: List[InstanceData],
                batch_img_metas: List[dict]) -> list:
        """Match the queries of every image to its ground truth.

        Args:
            cls_scores (Tensor): (bs, num_queries, num_classes) logits.
            pred_boxes (Tensor): (bs, num_queries, 4) pixel (x1, y1, x2, y2).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta per image.

        Returns:
            list[AssignResult]: One per image.
        """
        if not hasattr(self, 'assigner'):
            raise RuntimeError(f'{type(self).__name__} was built without '
                               'train_cfg.assigner and cannot compute losses')
        batch_pred_instances = [
            InstanceData(scores=scores, bboxes=boxes)
            for scores, boxes in zip(cls_scores, pred_boxes)
        ]
        if hasattr(self.assigner, 'assign_batch'):
            return self.assigner.assign_batch(batch_pred_instances,
                                              batch_gt_instances,
                                              batch_img_metas)
        return [
            self.assigner.assign(
                pred_instances=pred_instances,
                gt_instances=gt_instances,
                img_meta=img_meta)
            for pred_instances, gt_instances, img_meta in zip(
                batch_pred_instances, batch_gt_instances, batch_img_metas)
        ]

    def get_targets(self, cls_scores: Tensor, bbox_preds: Tensor,
                    batch_gt_instances: List[InstanceData],
                    batch_img_metas: List[dict]) -> Tuple[Tensor, ...]:
        """Match the queries of one decoder layer and build their targets.

        Args:
            cls_scores (Tensor): (bs, num_queries, num_classes) logits.
            bbox_preds (Tensor): (bs, num_queries, 4) normalised
                (cx, cy, w, h) in [0, 1].
            batch_gt_instances (list[InstanceData]): Ground truth per image:
                ``labels`` (num_gts,) and pixel ``bboxes`` (num_gts, 4)
                (x1, y1, x2, y2).
            batch_img_metas (list[dict]): Meta per image (``img_shape``).

        Returns:
            tuple:

            - labels (Tensor): (bs, num_queries) class of the matched ground
              truth, ``num_classes`` for background.
            - bbox_targets (Tensor): (bs, num_queries, 4) normalised
              (cx, cy, w, h) of the matched ground truth, 0 elsewhere.
            - bbox_weights (Tensor): (bs, num_queries, 4), 1 for matched
              queries, 0 elsewhere.
            - num_matched (int): Number of matched queries in the batch.
        """
        batch_size, num_queries = bbox_preds.shape[:2]
        if len(batch_gt_instances) != batch_size or len(
                batch_img_metas) != batch_size:
            raise ValueError(f'predictions cover {batch_size} images but got '
                             f'{len(batch_gt_instances)} ground truths and '
                             f'{len(batch_img_metas)} image metas')
        factors = image_size_factors(batch_img_metas, bbox_preds)
        pred_boxes = bbox_cxcywh_to_xyxy(bbox_preds) * factors
        assign_results = self._assign(cls_scores, pred_boxes,
                                      batch_gt_instances, batch_img_metas)

        box_dtype = bbox_preds.dtype
        if batch_gt_instances:
            box_dtype = batch_gt_instances[0].bboxes.dtype
        labels = torch.full((batch_size, num_queries),
                            self.num_classes,
                            dtype=torch.long,
                            device=bbox_preds.device)
        bbox_targets = bbox_preds.new_zeros((batch_size, num_queries, 4),
                                            dtype=box_dtype)
        bbox_weights = torch.zeros_like(bbox_targets)
        num_matched = 0
        for index, (gt_instances, result) in enumerate(
                zip(batch_gt_instances, assign_results)):
            matched_queries = torch.nonzero(result.gt_inds > 0).squeeze(1)
            matched_gts = result.gt_inds[matched_queries] - 1
            labels[index, matched_queries] = gt_instances.labels[matched_gts]
            # Boxes are learnt as (cx, cy, w, h) relative to the image.
            bbox_targets[index, matched_queries] = bbox_xyxy_to_cxcywh(
                gt_instances.bboxes[matched_gts] / factors[index])
            bbox_weights[index, matched_queries] = 1.0
            num_matched += matched_queries.numel()
        return labels, bbox_targets, bbox_weights, num_matched

    def loss_of_layer(
            self, cls_scores: Tensor, bbox_preds: Tensor,
            batch_gt_instances: List[InstanceData],
            batch_img_metas: List[dict]) -> Tuple[Tensor, Tensor, Tensor]:
        """Classification, L1 and IoU losses of one decoder layer's output.

        Args:
            cls_scores (Tensor): (bs, num_queries, num_classes) logits.
            bbox_preds (Tensor): (bs, num_queries, 4) normalised
                (cx, cy, w, h).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta per image (``img_shape``).

        Returns:
            tuple[Tensor]: Scalar ``loss_cls``, ``loss_bbox``, ``loss_iou``.
        """
        labels, bbox_targets, bbox_weights, num_matched = self.get_targets(
            cls_scores, bbox_preds, batch_gt_instances, batch_img_metas)

        # Every ground truth is matched once, so the matched count is the
        # number of objects; the classification loss is normalised by it
        # (background queries add no weight, as in Deformable DETR).
        cls_avg_factor = cls_scores.new_tensor(float(num_matched))
        if self.sync_cls_avg_factor:
            cls_avg_factor = reduce_mean(cls_avg_factor)
        cls_avg_factor = cls_avg_factor.clamp(min=1)
        loss_cls = self.loss_cls(
            cls_scores.reshape(-1, self.cls_out_channels),
            labels.reshape(-1),
            avg_factor=cls_avg_factor)

        # The box losses always use the object count averaged over
        # processes, so that every process weighs a box the same.
        num_objects = reduce_mean(cls_scores.new_tensor([num_matched]))
        num_objects = num_objects.clamp(min=1).item()

        factors = image_size_factors(batch_img_metas, bbox_preds)
        factors = factors.expand_as(bbox_preds).reshape(-1, 4)
        bbox_preds = bbox_preds.reshape(-1, 4)
        bbox_targets = bbox_targets.reshape(-1, 4)
        bbox_weights = bbox_weights.reshape(-1, 4)
        # The IoU loss compares pixel boxes: normalised coordinates would
        # distort the aspect ratio of non-square images.
        loss_iou = self.loss_iou(
            bbox_cxcywh_to_xyxy(bbox_preds) * factors,
            bbox_cxcywh_to_xyxy(bbox_targets) * factors,
            bbox_weights,
            avg_factor=num_objects)
        loss_bbox = self.loss_bbox(
            bbox_preds, bbox_targets, bbox_weights, avg_factor=num_objects)
        return loss_cls, loss_bbox, loss_iou
