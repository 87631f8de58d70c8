"""Prediction head of Conditional DETR (Meng et al., ICCV 2021).

One classifier and one box MLP serve every decoder layer. Boxes are
predicted relative to the query's reference point: the MLP's (cx, cy)
are added to the point's logits, so the content embedding only says how
far the object's centre lies from the point, and how big the box is.

Training uses :class:`SetPredictionHead`'s matching and losses, with
mmdet's names (``loss_cls``, ``loss_bbox``, ``loss_iou`` of the last
layer, ``d{i}.loss_*`` of the others); classification is sigmoid focal
loss, as in the paper.

Shape shorthand: ``num_layers`` decoder layers, ``bs`` images,
``num_queries`` queries, ``embed_dims`` channels.
"""
from typing import List, Optional, Tuple

from mmengine.model import bias_init_with_prob
from mmengine.structures import InstanceData
from torch import Tensor, nn

from ddetr_plugin.models.layers.mlp import build_mlp
from ddetr_plugin.registry import MODELS
from .set_prediction_head import (DEFAULT_TEST_CFG, DEFAULT_TRAIN_CFG,
                                  FOCAL_LOSS, GIOU_LOSS, L1_LOSS,
                                  SetPredictionHead, box_logits)


@MODELS.register_module()
class ConditionalDETRHead(SetPredictionHead):
    """Class and box branches shared by all decoder layers, with losses.

    Takes the arguments of mmdet 3.3.0's ``ConditionalDETRHead``.

    Args:
        num_classes (int): Number of object classes (no background).
        embed_dims (int): Channels of the decoder's query features.
            Defaults to 256.
        num_reg_fcs (int): Hidden (Linear + ReLU) layers of the box MLP
            before its output layer. Defaults to 2.
        sync_cls_avg_factor (bool): Average the classification loss's
            normaliser over processes. Defaults to False.
        loss_cls (dict): Classification loss; sigmoid focal loss (gamma 2,
            alpha 0.25, weight 2) by default.
        loss_bbox (dict): L1 loss on normalised (cx, cy, w, h), weight 5 by
            default.
        loss_iou (dict): GIoU loss on pixel boxes, weight 2 by default.
        train_cfg (dict): ``assigner``: the Hungarian assigner with focal,
            L1 and GIoU costs (weights 2, 5, 2) by default.
        test_cfg (dict): ``max_per_img``: detections kept per image
            (100 by default).
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
        self.embed_dims = embed_dims
        self.num_reg_fcs = num_reg_fcs
        self.cls_branch = nn.Linear(embed_dims, self.cls_out_channels)
        self.reg_branch = build_mlp(embed_dims, embed_dims, 4, num_reg_fcs + 1)

    def init_weights(self) -> None:
        """Start every query at a 1% object probability (the focal loss
        would otherwise be swamped by the background at the start)."""
        super().init_weights()
        nn.init.constant_(self.cls_branch.bias, bias_init_with_prob(0.01))

    def classifier_weight_names(self) -> List[str]:
        """The one classifier's weight."""
        return ['cls_branch.weight']

    def forward(self, hidden_states: Tensor,
                references: Tensor) -> Tuple[Tensor, Tensor]:
        """Class logits and boxes of every decoder layer.

        Args:
            hidden_states (Tensor): (num_layers, bs, num_queries,
                embed_dims) query features after each decoder layer.
            references (Tensor): (bs, num_queries, 2) normalised (x, y)
                reference points, the same for every layer.

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
        boxes = box_logits(
            self.reg_branch(hidden_states), references,
            'references').sigmoid()
        return self.cls_branch(hidden_states), boxes

    def loss(self, hidden_states: Tensor, references: Tensor,
             batch_data_samples: list) -> dict:
        """Losses of every decoder layer.

        Args:
            hidden_states (Tensor): See :meth:`forward`.
            references (Tensor): See :meth:`forward`.
            batch_data_samples (list[DetDataSample]): ``gt_instances`` and
                meta of each image.

        Returns:
            dict[str, Tensor]: ``loss_cls``, ``loss_bbox``, ``loss_iou`` of
            the last layer and ``d{i}.loss_*`` of the earlier ones.
        """
        all_layers_cls_scores, all_layers_bbox_preds = self(
            hidden_states, references)
        return self.loss_by_feat(
            all_layers_cls_scores, all_layers_bbox_preds, None, None,
            [sample.gt_instances for sample in batch_data_samples],
            [sample.metainfo for sample in batch_data_samples])

    def predict(self,
                hidden_states: Tensor,
                references: Tensor,
                batch_data_samples: list,
                rescale: bool = True) -> List[InstanceData]:
        """Detections of the last decoder layer.

        Args:
            hidden_states (Tensor): See :meth:`forward`.
            references (Tensor): See :meth:`forward`.
            batch_data_samples (list[DetDataSample]): Meta of each image.
            rescale (bool): Return boxes in the original image's pixels.
                Defaults to True.

        Returns:
            list[InstanceData]: Per image ``scores``, ``labels`` and
            ``bboxes`` (x1, y1, x2, y2), ``max_per_img`` of each.
        """
        # Only the last layer is detected: its predictions alone are needed.
        all_layers_cls_scores, all_layers_bbox_preds = self(
            hidden_states[-1:], references)
        return self.predict_by_feat(
            all_layers_cls_scores,
            all_layers_bbox_preds,
            batch_img_metas=[sample.metainfo for sample in batch_data_samples],
            rescale=rescale)
