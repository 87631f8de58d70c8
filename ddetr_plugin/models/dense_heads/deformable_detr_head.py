"""Prediction head of Deformable DETR (Zhu et al., ICLR 2021).

For every decoder layer the head turns the query features into class logits
and a box. Boxes are refined iteratively, as in the paper: a layer predicts
a delta that is added to its reference box in inverse-sigmoid space, so the
reference (a point (cx, cy) or a box (cx, cy, w, h), normalised to [0, 1])
is where the query looked and the delta says how to correct it.

Training losses come from :class:`SetPredictionHead` for every decoder layer
(auxiliary losses ``d0.loss_cls``, ... and the last layer's ``loss_cls``,
...), plus, for the two-stage variant, a class-agnostic loss on the
encoder's proposals (``enc_loss_cls``, ...).

Shape shorthand: ``num_layers`` decoder layers, ``bs`` images,
``num_queries`` queries, ``embed_dims`` feature channels.
"""
import copy
from typing import List, Optional, Tuple

import torch
from mmengine.model import bias_init_with_prob
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ddetr_plugin.models.layers.mlp import build_mlp
from ddetr_plugin.registry import MODELS
from .set_prediction_head import (DEFAULT_TEST_CFG, DEFAULT_TRAIN_CFG,
                                  FOCAL_LOSS, GIOU_LOSS, L1_LOSS,
                                  SetPredictionHead, box_logits)


@MODELS.register_module()
class DeformableDETRHead(SetPredictionHead):
    """Class and box branches of Deformable DETR, with their losses.

    Args:
        num_classes (int): Number of object classes (no background).
        embed_dims (int): Channels of the decoder's query features.
            Defaults to 256.
        num_reg_fcs (int): Hidden (Linear + ReLU) layers of the box branch
            before its output layer. Defaults to 2.
        sync_cls_avg_factor (bool): Average the classification loss's
            normaliser over processes. Defaults to False.
        loss_cls (dict): Classification loss; sigmoid focal loss (gamma 2,
            alpha 0.25, weight 2) by default.
        loss_bbox (dict): L1 loss on normalised (cx, cy, w, h), weight 5 by
            default.
        loss_iou (dict): GIoU loss on pixel boxes, weight 2 by default.
        train_cfg (dict): ``assigner``: the Hungarian assigner with focal,
            L1 (cx, cy, w, h) and GIoU costs (weights 2, 5, 2) by default.
        test_cfg (dict): ``max_per_img``: detections kept per image
            (100 by default).
        share_pred_layer (bool): One pair of branches shared by all layers
            (plain Deformable DETR) instead of one pair per layer (box
            refinement). Defaults to False.
        num_pred_layer (int): Number of branch pairs: the decoder layers,
            plus one for the encoder proposals when ``as_two_stage``.
            Defaults to 6.
        as_two_stage (bool): The encoder proposes the queries (two-stage
            Deformable DETR); enables the proposal loss. Defaults to False.
        init_cfg (dict, optional): Initialisation config.
    """

    def __init__(self,
                 num_classes: int,
                 embed_dims: int = 256,
                 num_reg_fcs: int = 2,
                 sync_cls_avg_factor: bool = False,
                 loss_cls: dict = FOCAL_LOSS,
                 loss_bbox: dict = L1_LOSS,
                 loss_iou: dict = GIOU_LOSS,
                 train_cfg: Optional[dict] = DEFAULT_TRAIN_CFG,
                 test_cfg: Optional[dict] = DEFAULT_TEST_CFG,
                 share_pred_layer: bool = False,
                 num_pred_layer: int = 6,
                 as_two_stage: bool = False,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(
            num_classes=num_classes,
            sync_cls_avg_factor=sync_cls_avg_factor,
            loss_cls=loss_cls,
            loss_bbox=loss_bbox,
            loss_iou=loss_iou,
            train_cfg=train_cfg,
            test_cfg=test_cfg,
            init_cfg=init_cfg)
        if num_pred_layer < 1:
            raise ValueError('num_pred_layer must be at least 1, got '
                             f'{num_pred_layer}')
        self.embed_dims = embed_dims
        self.num_reg_fcs = num_reg_fcs
        self.share_pred_layer = share_pred_layer
        self.num_pred_layer = num_pred_layer
        self.as_two_stage = as_two_stage
        self._init_layers()

    def _init_layers(self) -> None:
        """Build ``cls_branches`` and ``reg_branches``, one per prediction
        layer (the same module repeated when ``share_pred_layer``)."""
        cls_branch = nn.Linear(self.embed_dims, self.cls_out_channels)
        reg_branch = build_mlp(self.embed_dims, self.embed_dims, 4,
                               self.num_reg_fcs + 1)

        if self.share_pred_layer:
            cls_branches = [cls_branch] * self.num_pred_layer
            reg_branches = [reg_branch] * self.num_pred_layer
        else:
            cls_branches = [
                copy.deepcopy(cls_branch) for _ in range(self.num_pred_layer)
            ]
            reg_branches = [
                copy.deepcopy(reg_branch) for _ in range(self.num_pred_layer)
            ]
        self.cls_branches = nn.ModuleList(cls_branches)
        self.reg_branches = nn.ModuleList(reg_branches)

    def init_weights(self) -> None:
        """Start every query at a 1% object probability and every box at
        its reference."""
        super().init_weights()
        prior_bias = bias_init_with_prob(0.01)
        for cls_branch in self.cls_branches:
            nn.init.constant_(cls_branch.bias, prior_bias)
        for reg_branch in self.reg_branches:
            nn.init.constant_(reg_branch[-1].weight, 0.0)
            nn.init.constant_(reg_branch[-1].bias, 0.0)
        if not self.as_two_stage:
            # The first layer's reference is a point: start with small boxes
            # (sigmoid(-2) ~ 0.12 of the image). Two-stage references are
            # already boxes (the proposals), so the delta starts at 0.
            nn.init.constant_(self.reg_branches[0][-1].bias[2:], -2.0)

    def classifier_weight_names(self) -> List[str]:
        """``cls_branches.{i}.weight`` of every prediction layer."""
        return [
            f'cls_branches.{index}.weight'
            for index in range(self.num_pred_layer)
        ]

    def forward(self, hidden_states: Tensor,
                references: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Class logits and refined boxes of every decoder layer.

        Args:
            hidden_states (Tensor): (num_layers, bs, num_queries,
                embed_dims) query features after each decoder layer.
            references (list[Tensor]): At least ``num_layers`` references,
                the input reference of each layer (the decoder's initial one
                first; a trailing extra one is ignored). Each is
                (bs, num_queries, 2) normalised (cx, cy) or
                (bs, num_queries, 4) normalised (cx, cy, w, h).

        Returns:
            tuple[Tensor]:

            - all_layers_cls_scores: (num_layers, bs, num_queries,
              num_classes) logits.
            - all_layers_bbox_preds: (num_layers, bs, num_queries, 4)
              normalised (cx, cy, w, h) in [0, 1].
        """
        if hidden_states.dim() != 4:
            raise ValueError(
                'hidden_states must be (num_layers, bs, num_queries, '
                f'embed_dims), got shape {tuple(hidden_states.shape)}')
        num_layers = hidden_states.shape[0]
        if num_layers > self.num_pred_layer:
            raise ValueError(
                f'hidden_states has {num_layers} decoder layers but the head '
                f'has {self.num_pred_layer} prediction layers '
                '(num_pred_layer)')
        if len(references) < num_layers:
            raise ValueError(
                f'need one reference per decoder layer ({num_layers}), got '
                f'{len(references)}')

        all_layers_cls_scores, all_layers_bbox_preds = [], []
        for layer_index in range(num_layers):
            hidden_state = hidden_states[layer_index]
            cls_scores = self.cls_branches[layer_index](hidden_state)
            box_delta = self.reg_branches[layer_index](hidden_state)
            all_layers_bbox_preds.append(
                box_logits(box_delta, references[layer_index],
                           f'reference {layer_index}').sigmoid())
            all_layers_cls_scores.append(cls_scores)
        return (torch.stack(all_layers_cls_scores),
                torch.stack(all_layers_bbox_preds))

    def loss(self, hidden_states: Tensor, references: List[Tensor],
             enc_outputs_class: Optional[Tensor],
             enc_outputs_coord: Optional[Tensor],
             batch_data_samples: list) -> dict:
        """Losses of every decoder layer and of the encoder proposals.

        Args:
            hidden_states (Tensor): (num_layers, bs, num_queries,
                embed_dims), see :meth:`forward`.
            references (list[Tensor]): See :meth:`forward`.
            enc_outputs_class (Tensor, optional): (bs, num_feat_points,
                num_classes) proposal logits of the encoder (two-stage
                only; only channel 0, "object", is trained), or None.
            enc_outputs_coord (Tensor, optional): (bs, num_feat_points, 4)
                normalised (cx, cy, w, h) proposals, or None.
            batch_data_samples (list[DetDataSample]): ``gt_instances`` and
                meta of each image.

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_bbox``, ``loss_iou`` of
            the last layer, ``d{i}.loss_*`` of the earlier ones and, for
            two-stage, ``enc_loss_*``.
        """
        batch_gt_instances = [
            sample.gt_instances for sample in batch_data_samples
        ]
        batch_img_metas = [sample.metainfo for sample in batch_data_samples]
        all_layers_cls_scores, all_layers_bbox_preds = self(
            hidden_states, references)
        return self.loss_by_feat(all_layers_cls_scores, all_layers_bbox_preds,
                                 enc_outputs_class, enc_outputs_coord,
                                 batch_gt_instances, batch_img_metas)

    def predict(self,
                hidden_states: Tensor,
                references: List[Tensor],
                batch_data_samples: list,
                rescale: bool = True) -> List[InstanceData]:
        """Detections of the last decoder layer.

        Args:
            hidden_states (Tensor): (num_layers, bs, num_queries,
                embed_dims), see :meth:`forward`.
            references (list[Tensor]): See :meth:`forward`.
            batch_data_samples (list[DetDataSample]): Meta of each image.
            rescale (bool): Return boxes in the original image's pixels
                (undoing the test-time resize) instead of the network
                input's. Defaults to True.

        Returns:
            list[InstanceData]: Per image ``scores`` (k,), ``labels`` (k,)
            and ``bboxes`` (k, 4) (x1, y1, x2, y2), k = ``max_per_img``.
        """
        batch_img_metas = [sample.metainfo for sample in batch_data_samples]
        all_layers_cls_scores, all_layers_bbox_preds = self(
            hidden_states, references)
        return self.predict_by_feat(
            all_layers_cls_scores,
            all_layers_bbox_preds,
            batch_img_metas=batch_img_metas,
            rescale=rescale)
