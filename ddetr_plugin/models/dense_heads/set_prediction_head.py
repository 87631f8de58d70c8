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
import copy
from typing import List, Optional, Tuple

import torch
from mmdet.structures.bbox import bbox_cxcywh_to_xyxy, bbox_xyxy_to_cxcywh
from mmdet.utils import reduce_mean
from mmengine.dist import is_distributed
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor

from ddetr_plugin.models.layers.decoder import inverse_sigmoid
from ddetr_plugin.models.task_modules.assigners import MATCHED_PAIRS
from ddetr_plugin.registry import MODELS, TASK_UTILS

# The losses and matching costs of Deformable DETR, which Conditional DETR
# shares (sigmoid focal classification, L1 and GIoU boxes).
FOCAL_LOSS = dict(
    type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=2.0)
L1_LOSS = dict(type='L1Loss', loss_weight=5.0)
GIOU_LOSS = dict(type='GIoULoss', loss_weight=2.0)
DEFAULT_TRAIN_CFG = dict(
    assigner=dict(
        type='HungarianAssigner',
        match_costs=[
            dict(type='FocalLossCost', weight=2.0),
            dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
            dict(type='IoUCost', iou_mode='giou', weight=2.0)
        ]))
DEFAULT_TEST_CFG = dict(max_per_img=100)


def box_logits(deltas: Tensor, reference: Tensor, name: str) -> Tensor:
    """Box logits: predicted deltas added to a reference in logit space.

    Args:
        deltas (Tensor): (..., 4) predicted (cx, cy, w, h) deltas.
        reference (Tensor): (..., 2) normalised (cx, cy) or (..., 4)
            normalised (cx, cy, w, h).
        name (str): What the reference is, for the error message.

    Returns:
        Tensor: (..., 4) logits of normalised (cx, cy, w, h).
    """
    reference = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return deltas + reference
    if reference.shape[-1] == 2:
        # A point reference only anchors the centre; width and height come
        # from the delta alone.
        return torch.cat([deltas[..., :2] + reference, deltas[..., 2:]],
                         dim=-1)
    raise ValueError(f'{name} must end in 2 (cx, cy) or 4 (cx, cy, w, h) '
                     f'coordinates, got shape {tuple(reference.shape)}')


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
        train_cfg = copy.deepcopy(train_cfg)
        self.train_cfg = train_cfg
        self.test_cfg = copy.deepcopy(test_cfg) if test_cfg is not None \
            else dict()
        self.loss_cls = MODELS.build(copy.deepcopy(loss_cls))
        self.loss_bbox = MODELS.build(copy.deepcopy(loss_bbox))
        self.loss_iou = MODELS.build(copy.deepcopy(loss_iou))
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

    def classifier_weight_names(self) -> List[str]:
        """Names of the classification layers' weights in the head's state
        dict (their first axis is the number of classes)."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args,
                              **kwargs) -> None:
        """Explain a class-count mismatch with a checkpoint before PyTorch
        reports the bare size mismatch."""
        error_msgs = args[-1] if args else kwargs.get('error_msgs')
        for name in self.classifier_weight_names():
            key = prefix + name
            if key not in state_dict or error_msgs is None:
                continue
            rows = state_dict[key].shape[0]
            if rows != self.cls_out_channels:
                hint = ''
                if rows == 91:
                    hint = (' (91 rows is the layout of the official '
                            'Deformable-DETR and ConditionalDETR COCO '
                            'checkpoints: convert them with '
                            'tools/model_converters/official_to_plugin.py)')
                error_msgs.append(
                    f'{key}: the checkpoint classifies {rows} classes but '
                    f'the head was built with num_classes='
                    f'{self.num_classes}{hint}; set num_classes to match '
                    'the checkpoint, or load it non-strictly to train a '
                    'new classifier')
                break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def match(self, layer_outputs: List[Tuple[Tensor, Tensor, list]],
              batch_img_metas: List[dict]) -> List[list]:
        """Match the queries of several layers to the ground truth at once.

        With the plugin's assigner, the cost matrices of every layer and
        image reach the host in one copy, so a training step waits for the
        device once for matching instead of once per layer and image.

        Args:
            layer_outputs (list[tuple]): Per layer, ``cls_scores``
                (bs, num_queries, num_classes) logits, ``bbox_preds``
                (bs, num_queries, 4) normalised (cx, cy, w, h) and the
                ground truth of each image (list[InstanceData]) to match.
            batch_img_metas (list[dict]): Meta per image (``img_shape``).

        Returns:
            list[list[AssignResult]]: Per layer, one result per image.
        """
        if not hasattr(self, 'assigner'):
            raise RuntimeError(f'{type(self).__name__} was built without '
                               'train_cfg.assigner and cannot compute losses')
        all_preds, all_gts, all_metas = [], [], []
        for cls_scores, bbox_preds, batch_gt_instances in layer_outputs:
            batch_size = bbox_preds.shape[0]
            if len(batch_gt_instances) != batch_size or len(
                    batch_img_metas) != batch_size:
                raise ValueError(
                    f'predictions cover {batch_size} images but got '
                    f'{len(batch_gt_instances)} ground truths and '
                    f'{len(batch_img_metas)} image metas')
            # The costs compare pixel (x1, y1, x2, y2) boxes.
            factors = image_size_factors(batch_img_metas, bbox_preds)
            pred_boxes = bbox_cxcywh_to_xyxy(bbox_preds) * factors
            all_preds += [
                InstanceData(scores=scores, bboxes=boxes)
                for scores, boxes in zip(cls_scores, pred_boxes)
            ]
            all_gts += list(batch_gt_instances)
            all_metas += list(batch_img_metas)
        if hasattr(self.assigner, 'assign_batch'):
            results = self.assigner.assign_batch(all_preds, all_gts, all_metas)
        else:
            results = [
                self.assigner.assign(
                    pred_instances=preds, gt_instances=gts, img_meta=meta)
                for preds, gts, meta in zip(all_preds, all_gts, all_metas)
            ]
        batch_size = len(batch_img_metas)
        return [
            results[start:start + batch_size]
            for start in range(0, len(results), batch_size)
        ]

    def get_targets(
            self, bbox_preds: Tensor, batch_gt_instances: List[InstanceData],
            batch_img_metas: List[dict],
            assign_results: list) -> Tuple[Tensor, Tensor, Tensor, int]:
        """Targets of one layer's queries from their matching.

        Args:
            bbox_preds (Tensor): (bs, num_queries, 4) normalised
                (cx, cy, w, h) in [0, 1].
            batch_gt_instances (list[InstanceData]): Ground truth per image:
                ``labels`` (num_gts,) and pixel ``bboxes`` (num_gts, 4)
                (x1, y1, x2, y2).
            batch_img_metas (list[dict]): Meta per image (``img_shape``).
            assign_results (list[AssignResult]): The layer's matching, one
                per image (see :meth:`match`).

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
        factors = image_size_factors(batch_img_metas, bbox_preds)
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
            pairs = result.get_extra_property(MATCHED_PAIRS)
            if pairs is None:
                # Another assigner: recover the pairs from gt_inds (a
                # nonzero, which waits for the device).
                matched_queries = torch.nonzero(result.gt_inds > 0).squeeze(1)
                pairs = (matched_queries, result.gt_inds[matched_queries] - 1)
            matched_queries, matched_gts = pairs
            labels[index, matched_queries] = gt_instances.labels[matched_gts]
            # Boxes are learnt as (cx, cy, w, h) relative to the image.
            bbox_targets[index, matched_queries] = bbox_xyxy_to_cxcywh(
                gt_instances.bboxes[matched_gts] / factors[index])
            bbox_weights[index, matched_queries] = 1.0
            num_matched += len(matched_queries)
        return labels, bbox_targets, bbox_weights, num_matched

    def loss_of_layer(
        self,
        cls_scores: Tensor,
        bbox_preds: Tensor,
        batch_gt_instances: List[InstanceData],
        batch_img_metas: List[dict],
        assign_results: Optional[list] = None
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Classification, L1 and IoU losses of one decoder layer's output.

        Args:
            cls_scores (Tensor): (bs, num_queries, num_classes) logits.
            bbox_preds (Tensor): (bs, num_queries, 4) normalised
                (cx, cy, w, h).
            batch_gt_instances (list[InstanceData]): Ground truth per image.
            batch_img_metas (list[dict]): Meta per image (``img_shape``).
            assign_results (list[AssignResult], optional): The layer's
                matching from :meth:`match`; computed here when None.

        Returns:
            tuple[Tensor]: Scalar ``loss_cls``, ``loss_bbox``, ``loss_iou``.
        """
        if assign_results is None:
            assign_results = self.match(
                [(cls_scores, bbox_preds, batch_gt_instances)],
                batch_img_metas)[0]
        labels, bbox_targets, bbox_weights, num_matched = self.get_targets(
            bbox_preds, batch_gt_instances, batch_img_metas, assign_results)

        # Every ground truth is matched once, so the matched count is the
        # number of objects; the classification loss is normalised by it
        # (background queries add no weight, as in Deformable DETR).
        if self.sync_cls_avg_factor:
            cls_avg_factor = reduce_mean(
                cls_scores.new_tensor(float(num_matched))).clamp(min=1)
        else:
            cls_avg_factor = max(float(num_matched), 1.0)
        loss_cls = self.loss_cls(
            cls_scores.reshape(-1, self.cls_out_channels),
            labels.reshape(-1),
            avg_factor=cls_avg_factor)

        # The box losses always use the object count averaged over
        # processes, so that every process weighs a box the same. Without
        # other processes the count stays on the host (no device wait).
        count_device = cls_scores.device if is_distributed() else 'cpu'
        num_objects = reduce_mean(
            torch.tensor([float(num_matched)], device=count_device))
        num_objects = max(num_objects.item(), 1.0)

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

    def loss_by_feat(self,
                     all_layers_cls_scores: Tensor,
                     all_layers_bbox_preds: Tensor,
                     enc_cls_scores: Optional[Tensor],
                     enc_bbox_preds: Optional[Tensor],
                     batch_gt_instances: List[InstanceData],
                     batch_img_metas: List[dict],
                     batch_gt_instances_ignore: Optional[list] = None) -> dict:
        """Losses from the head's outputs.

        Args:
            all_layers_cls_scores (Tensor): (num_layers, bs, num_queries,
                num_classes) logits.
            all_layers_bbox_preds (Tensor): (num_layers, bs, num_queries, 4)
                normalised (cx, cy, w, h).
            enc_cls_scores (Tensor, optional): (bs, num_feat_points,
                num_classes) encoder proposal logits, or None.
            enc_bbox_preds (Tensor, optional): (bs, num_feat_points, 4)
                encoder proposals, or None.
            batch_gt_instances (list[InstanceData]): ``labels`` (num_gts,)
                and pixel ``bboxes`` (num_gts, 4) (x1, y1, x2, y2) per
                image.
            batch_img_metas (list[dict]): Meta per image (``img_shape``).
            batch_gt_instances_ignore (list, optional): Unsupported; must
                be None.

        Returns:
            dict[str, Tensor]: See :meth:`loss`.
        """
        if batch_gt_instances_ignore is not None:
            raise ValueError(f'{type(self).__name__} does not support '
                             'ignored ground truth; pass None')
        num_layers = all_layers_cls_scores.shape[0]
        layer_outputs = [(all_layers_cls_scores[index],
                          all_layers_bbox_preds[index], batch_gt_instances)
                         for index in range(num_layers)]
        if enc_cls_scores is not None:
            # Proposals are class-agnostic: every object is class 0.
            proposal_gt_instances = []
            for gt_instances in batch_gt_instances:
                agnostic = gt_instances.clone()
                agnostic.labels = torch.zeros_like(gt_instances.labels)
                proposal_gt_instances.append(agnostic)
            layer_outputs.append(
                (enc_cls_scores, enc_bbox_preds, proposal_gt_instances))
        # One matching call for all layers: one wait for the device.
        all_assign_results = self.match(layer_outputs, batch_img_metas)

        losses = dict()
        for index, (outputs, assign_results) in enumerate(
                zip(layer_outputs, all_assign_results)):
            loss_cls, loss_bbox, loss_iou = self.loss_of_layer(
                *outputs, batch_img_metas, assign_results)
            if index == num_layers:
                prefix = 'enc_'
            elif index == num_layers - 1:
                prefix = ''
            else:
                prefix = f'd{index}.'
            losses[f'{prefix}loss_cls'] = loss_cls
            losses[f'{prefix}loss_bbox'] = loss_bbox
            losses[f'{prefix}loss_iou'] = loss_iou
        return losses

    def predict_by_feat(self,
                        all_layers_cls_scores: Tensor,
                        all_layers_bbox_preds: Tensor,
                        batch_img_metas: List[dict],
                        rescale: bool = False) -> List[InstanceData]:
        """Detections from the head's outputs (last layer only).

        Args:
            all_layers_cls_scores (Tensor): (num_layers, bs, num_queries,
                num_classes) logits.
            all_layers_bbox_preds (Tensor): (num_layers, bs, num_queries, 4)
                normalised (cx, cy, w, h).
            batch_img_metas (list[dict]): Meta per image: ``img_shape`` and,
                with ``rescale``, ``scale_factor`` (w_scale, h_scale).
            rescale (bool): See :meth:`predict`. Defaults to False.

        Returns:
            list[InstanceData]: See :meth:`predict`.
        """
        cls_scores = all_layers_cls_scores[-1]
        bbox_preds = all_layers_bbox_preds[-1]
        return [
            self._predict_single(cls_scores[index], bbox_preds[index],
                                 img_meta, rescale)
            for index, img_meta in enumerate(batch_img_metas)
        ]

    def _predict_single(self, cls_scores: Tensor, bbox_preds: Tensor,
                        img_meta: dict, rescale: bool) -> InstanceData:
        """Top-scoring (query, class) pairs of one image.

        Args:
            cls_scores (Tensor): (num_queries, num_classes) logits.
            bbox_preds (Tensor): (num_queries, 4) normalised (cx, cy, w, h).
            img_meta (dict): Meta of the image.
            rescale (bool): See :meth:`predict`.

        Returns:
            InstanceData: ``scores``, ``labels``, ``bboxes``.
        """
        num_queries, num_classes = cls_scores.shape
        max_per_img = self.test_cfg.get('max_per_img', num_queries)
        # A query may detect several classes: rank all (query, class) pairs.
        scores, pair_indices = cls_scores.sigmoid().view(-1).topk(
            min(max_per_img, num_queries * num_classes))
        labels = pair_indices % num_classes
        query_indices = pair_indices // num_classes

        height, width = img_meta['img_shape'][:2]
        boxes = bbox_cxcywh_to_xyxy(bbox_preds[query_indices])
        boxes[:, 0::2] = (boxes[:, 0::2] * width).clamp(min=0, max=width)
        boxes[:, 1::2] = (boxes[:, 1::2] * height).clamp(min=0, max=height)
        if rescale:
            if img_meta.get('scale_factor') is None:
                raise KeyError(
                    'rescale=True maps boxes back to the original image and '
                    "needs img_meta['scale_factor'] = (w_scale, h_scale); "
                    f'meta keys: {sorted(img_meta)}')
            boxes /= boxes.new_tensor(img_meta['scale_factor']).repeat((1, 2))

        results = InstanceData()
        results.bboxes = boxes
        results.scores = scores
        results.labels = labels
        return results
