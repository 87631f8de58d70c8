"""One-to-one matching of query predictions to ground truth.

DETR-style detectors predict a fixed set of queries and train each ground
truth box against exactly one query: the matching that minimises the summed
matching costs (classification, box L1, IoU), found with the Hungarian
algorithm (``scipy.optimize.linear_sum_assignment``). Unmatched queries are
background.
"""
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from mmdet.models.task_modules.assigners import AssignResult, BaseAssigner
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ddetr_plugin.registry import TASK_UTILS

CostConfig = Union[dict, ConfigDict]
# AssignResult extra property: (matched query indices, matched ground-truth
# indices), two (num_matched,) long tensors.
MATCHED_PAIRS = 'matched_pairs'


@TASK_UTILS.register_module()
class HungarianAssigner(BaseAssigner):
    """Assign each ground truth to one prediction by minimum-cost matching.

    The result follows MMDetection's convention: ``gt_inds[i]`` is 0 when
    prediction ``i`` is background and ``j + 1`` when it is matched to
    ground truth ``j``; ``labels[i]`` is the matched class or -1.

    Args:
        match_costs (dict or list[dict]): Configs of the match costs (built
            from the task-util registry), or already built callables. Their
            matrices are summed.
    """

    def __init__(self, match_costs: Union[CostConfig, Sequence[CostConfig]]):
        if isinstance(match_costs, dict) or callable(match_costs):
            match_costs = [match_costs]
        if not isinstance(match_costs, (list, tuple)) or not match_costs:
            raise ValueError('HungarianAssigner needs at least one match '
                             'cost (a config dict or a list of them), got '
                             f'{match_costs!r}')
        self.match_costs = [
            cost if callable(cost) else TASK_UTILS.build(cost)
            for cost in match_costs
        ]

    def _cost_matrix(self, pred_instances: InstanceData,
                     gt_instances: InstanceData,
                     img_meta: Optional[dict]) -> Tensor:
        """(num_preds, num_gts) sum of the weighted match costs."""
        total = None
        # The matching is a constant of the loss: no graph is needed.
        with torch.no_grad():
            for match_cost in self.match_costs:
                cost = match_cost(
                    pred_instances=pred_instances,
                    gt_instances=gt_instances,
                    img_meta=img_meta)
                total = cost if total is None else total + cost
        return total

    @staticmethod
    def _check_instances(pred_instances: InstanceData,
                         gt_instances: InstanceData) -> None:
        if not isinstance(getattr(gt_instances, 'labels', None), Tensor):
            raise TypeError('HungarianAssigner needs gt_instances.labels as '
                            'a Tensor of shape (num_gts,), got '
                            f'{type(getattr(gt_instances, "labels", None))}')

    @staticmethod
    def _check_labels(batch_pred_instances: List[InstanceData],
                      batch_gt_instances: List[InstanceData]) -> None:
        """Every ground-truth label must index a predicted class score.

        A label outside [0, num_classes) means the data set has more
        classes than the model; indexing the scores with it would fail with
        an error that names neither (or, at -1, silently read the last
        class). All labels of the batch are checked with one read of their
        minimum and maximum, so the device is waited for once.
        """
        labels, num_classes, seen = [], None, set()
        for pred_instances, gt_instances in zip(batch_pred_instances,
                                                batch_gt_instances):
            scores = getattr(pred_instances, 'scores', None)
            gt_labels = getattr(gt_instances, 'labels', None)
            # A head matches every decoder layer against the same ground
            # truth objects: each is checked once. Other problems are left
            # to the checks that name them.
            if (not isinstance(scores, Tensor) or scores.dim() != 2
                    or not isinstance(gt_labels, Tensor)
                    or id(gt_instances) in seen or gt_labels.numel() == 0):
                continue
            seen.add(id(gt_instances))
            labels.append(gt_labels.reshape(-1))
            num_classes = scores.shape[1]
        if not labels:
            return
        joined = torch.cat(labels)
        low, high = torch.stack((joined.min(), joined.max())).tolist()
        if 0 <= low and high < num_classes:
            return
        label = high if high >= num_classes else low
        raise ValueError(
            f'HungarianAssigner: ground-truth label {label} is outside the '
            f'{num_classes} classes the model predicts (labels 0 to '
            f'{num_classes - 1}, bbox_head.num_classes={num_classes}); the '
            'data set has more classes than the model: set '
            'model.bbox_head.num_classes to the number of classes of the '
            'data set (train_dataloader.dataset.metainfo.classes)')

    @staticmethod
    def _result(num_preds: int, num_gts: int, gt_labels: Tensor,
                matched_preds: np.ndarray,
                matched_gts: np.ndarray) -> AssignResult:
        """Build MMDetection's AssignResult from a matching."""
        device = gt_labels.device
        gt_inds = torch.zeros(num_preds, dtype=torch.long, device=device)
        labels = torch.full((num_preds, ), -1, dtype=torch.long, device=device)
        pred_index = torch.from_numpy(matched_preds).to(device)
        gt_index = torch.from_numpy(matched_gts).to(device)
        if len(matched_preds) > 0:
            gt_inds[pred_index] = gt_index + 1
            labels[pred_index] = gt_labels[gt_index]
        result = AssignResult(
            num_gts=num_gts, gt_inds=gt_inds, max_overlaps=None, labels=labels)
        # The pairs, in increasing query order, spare the head a nonzero()
        # on gt_inds, which would wait for the device.
        result.set_extra_property(MATCHED_PAIRS, (pred_index, gt_index))
        return result

    @staticmethod
    def _solve(cost: np.ndarray) -> tuple:
        """Minimum-cost matching of a (num_preds, num_gts) matrix."""
        if not np.isfinite(cost).all():
            raise ValueError(
                'HungarianAssigner: the matching cost holds NaN or infinite '
                'entries, so no matching can be found; the predicted scores '
                'or boxes (or the ground-truth boxes) are not finite. Cost '
                f'matrix shape {cost.shape}.')
        return linear_sum_assignment(cost)

    def assign(self,
               pred_instances: InstanceData,
               gt_instances: InstanceData,
               img_meta: Optional[dict] = None,
               **kwargs) -> AssignResult:
        """Match the predictions of one image to its ground truth.

        Args:
            pred_instances (InstanceData): ``scores`` (num_preds,
                num_classes) logits and ``bboxes`` (num_preds, 4) absolute
                (x1, y1, x2, y2).
            gt_instances (InstanceData): ``labels`` (num_gts,) and
                ``bboxes`` (num_gts, 4) absolute (x1, y1, x2, y2).
            img_meta (dict, optional): Image meta with ``img_shape``.

        Returns:
            AssignResult: ``gt_inds`` (num_preds,) 0 for background, j + 1
            for a match with ground truth j; ``labels`` (num_preds,).
        """
        return self.assign_batch([pred_instances], [gt_instances],
                                 [img_meta])[0]

    def assign_batch(
            self, batch_pred_instances: List[InstanceData],
            batch_gt_instances: List[InstanceData],
            batch_img_metas: List[Optional[dict]]) -> List[AssignResult]:
        """Match every image of a batch, with one device-to-host copy.

        The cost matrices are computed where the predictions live and
        copied to the host together, once for the whole batch instead of
        once per image (each copy waits for the device), then each image
        is solved on its own matrix. The result equals calling
        :meth:`assign` per image. The entries need not be distinct images:
        a head matches all its decoder layers in one call.

        Args:
            batch_pred_instances (list[InstanceData]): Predictions of each
                image, as in :meth:`assign`.
            batch_gt_instances (list[InstanceData]): Ground truth of each
                image, as in :meth:`assign`.
            batch_img_metas (list[dict]): Meta of each image.

        Returns:
            list[AssignResult]: One result per image.
        """
        if not (len(batch_pred_instances) == len(batch_gt_instances) ==
                len(batch_img_metas)):
            raise ValueError(
                'HungarianAssigner.assign_batch needs as many predictions, '
                'ground truths and image metas, got '
                f'{len(batch_pred_instances)}, {len(batch_gt_instances)} and '
                f'{len(batch_img_metas)}')
        self._check_labels(batch_pred_instances, batch_gt_instances)
        costs, blocks = [], []
        for pred_instances, gt_instances, img_meta in zip(
                batch_pred_instances, batch_gt_instances, batch_img_metas):
            self._check_instances(pred_instances, gt_instances)
            num_preds, num_gts = len(pred_instances), len(gt_instances)
            if num_preds == 0 or num_gts == 0:
                blocks.append(None)
                continue
            cost = self._cost_matrix(pred_instances, gt_instances, img_meta)
            if cost.shape != (num_preds, num_gts):
                raise ValueError(
                    'HungarianAssigner: the match costs must give a '
                    f'({num_preds}, {num_gts}) matrix, got '
                    f'{tuple(cost.shape)}')
            blocks.append(len(costs))
            costs.append(cost)
        host_costs = []
        if costs:
            # Flattened, the matrices of any shapes join into one tensor, so
            # the whole batch crosses to the host in one copy.
            joined = torch.cat([cost.flatten() for cost in costs])
            # numpy has no bfloat16; widening half precision is exact.
            if joined.dtype in (torch.float16, torch.bfloat16):
                joined = joined.float()
            joined = joined.cpu().numpy()
            start = 0
            for cost in costs:
                host_costs.append(joined[start:start + cost.numel()].reshape(
                    cost.shape))
                start += cost.numel()

        results = []
        for pred_instances, gt_instances, block in zip(batch_pred_instances,
                                                       batch_gt_instances,
                                                       blocks):
            num_preds, num_gts = len(pred_instances), len(gt_instances)
            if block is None:
                empty = np.zeros(0, dtype=np.int64)
                results.append(
                    self._result(num_preds, num_gts, gt_instances.labels,
                                 empty, empty))
                continue
            matched_preds, matched_gts = self._solve(host_costs[block])
            results.append(
                self._result(num_preds, num_gts, gt_instances.labels,
                             matched_preds.astype(np.int64),
                             matched_gts.astype(np.int64)))
        return results
