"""Hungarian assigner and match costs of the ddetr_plugin scope."""
import itertools

import pytest
import torch
from mmdet.registry import TASK_UTILS as MMDET_TASK_UTILS
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

from ddetr_plugin.models.task_modules import (BBoxL1Cost, FocalLossCost,
                                              HungarianAssigner, IoUCost)
from ddetr_plugin.models.task_modules.assigners import MATCHED_PAIRS
from ddetr_plugin.registry import TASK_UTILS

IMAGE_SIZE = (60, 80)  # (height, width)
IMG_META = dict(img_shape=IMAGE_SIZE)
MATCH_COSTS = [
    dict(type='FocalLossCost', weight=2.0),
    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0)
]


def random_boxes(num: int,
                 generator: torch.Generator,
                 dtype=torch.float32) -> torch.Tensor:
    """(num, 4) valid pixel (x1, y1, x2, y2) boxes inside IMAGE_SIZE."""
    height, width = IMAGE_SIZE
    corners = torch.rand(num, 2, generator=generator, dtype=dtype) * 0.7
    sizes = torch.rand(num, 2, generator=generator, dtype=dtype) * 0.3 + 0.02
    boxes = torch.cat([corners, corners + sizes], dim=1)
    return boxes * boxes.new_tensor([width, height, width, height])


def random_case(num_preds: int,
                num_gts: int,
                num_classes: int = 5,
                seed: int = 0,
                dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    preds = InstanceData(
        scores=torch.randn(
            num_preds, num_classes, generator=generator, dtype=dtype),
        bboxes=random_boxes(num_preds, generator, dtype))
    gts = InstanceData(
        labels=torch.randint(num_classes, (num_gts, ), generator=generator),
        bboxes=random_boxes(num_gts, generator, dtype))
    return preds, gts


def build_plugin_assigner() -> HungarianAssigner:
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        return TASK_UTILS.build(
            dict(type='HungarianAssigner', match_costs=MATCH_COSTS))


def build_mmdet_assigner():
    with DefaultScope.overwrite_default_scope('mmdet'):
        return MMDET_TASK_UTILS.build(
            dict(type='HungarianAssigner', match_costs=MATCH_COSTS))


def total_cost(assigner, preds, gts) -> torch.Tensor:
    return sum(
        cost(pred_instances=preds, gt_instances=gts, img_meta=IMG_META)
        for cost in assigner.match_costs)


def test_registry_gives_plugin_classes_and_keeps_mmdet_ones():
    assigner = build_plugin_assigner()
    assert type(assigner) is HungarianAssigner
    assert [type(cost) for cost in assigner.match_costs
            ] == [FocalLossCost, BBoxL1Cost, IoUCost]
    mmdet_assigner = build_mmdet_assigner()
    assert type(mmdet_assigner) is not HungarianAssigner
    assert type(mmdet_assigner).__module__.startswith('mmdet.')
    assert not isinstance(mmdet_assigner.match_costs[0], FocalLossCost)


@pytest.mark.parametrize('num_preds,num_gts,seed', [(3, 2, 0), (4, 3, 1),
                                                    (5, 2, 2), (4, 4, 3),
                                                    (6, 1, 4)])
def test_matching_is_optimal_by_brute_force(num_preds, num_gts, seed):
    assigner = build_plugin_assigner()
    preds, gts = random_case(
        num_preds, num_gts, seed=seed, dtype=torch.float64)
    result = assigner.assign(preds, gts, IMG_META)
    cost = total_cost(assigner, preds, gts)

    matched = torch.nonzero(result.gt_inds > 0).squeeze(1)
    assert len(matched) == num_gts  # every ground truth is matched once
    assert sorted(
        (result.gt_inds[matched] - 1).tolist()) == list(range(num_gts))
    assigned_cost = sum(cost[query, result.gt_inds[query] - 1]
                        for query in matched.tolist())
    best_cost = min(
        sum(cost[query, gt] for gt, query in enumerate(queries))
        for queries in itertools.permutations(range(num_preds), num_gts))
    assert float(assigned_cost) == pytest.approx(float(best_cost), abs=1e-9)
    # Labels follow the matched ground truth; unmatched queries get -1.
    for query in range(num_preds):
        gt_index = int(result.gt_inds[query])
        expected = gts.labels[gt_index - 1] if gt_index > 0 else -1
        assert int(result.labels[query]) == int(expected)


def test_matched_pairs_agree_with_gt_inds():
    preds, gts = random_case(20, 6, seed=8)
    result = build_plugin_assigner().assign(preds, gts, IMG_META)
    queries, gt_indices = result.get_extra_property(MATCHED_PAIRS)
    expected_queries = torch.nonzero(result.gt_inds > 0).squeeze(1)
    assert torch.equal(queries, expected_queries)
    assert torch.equal(gt_indices, result.gt_inds[expected_queries] - 1)


def test_no_ground_truth_makes_every_query_background():
    preds, gts = random_case(7, 0)
    result = build_plugin_assigner().assign(preds, gts, IMG_META)
    assert result.num_gts == 0
    assert result.gt_inds.tolist() == [0] * 7
    assert result.labels.tolist() == [-1] * 7


def test_no_prediction_gives_an_empty_assignment():
    preds, gts = random_case(0, 3)
    result = build_plugin_assigner().assign(preds, gts, IMG_META)
    assert result.num_gts == 3
    assert result.gt_inds.numel() == 0 and result.labels.numel() == 0


def test_batched_matching_equals_per_image_matching():
    assigner = build_plugin_assigner()
    cases = [
        random_case(9, num_gts, seed=seed)
        for seed, num_gts in enumerate([3, 0, 9, 1])
    ]
    metas = [dict(img_shape=(60 + 10 * index, 80)) for index in range(4)]
    batched = assigner.assign_batch([preds for preds, _ in cases],
                                    [gts for _, gts in cases], metas)
    for (preds, gts), meta, result in zip(cases, metas, batched):
        single = assigner.assign(preds, gts, meta)
        assert torch.equal(result.gt_inds, single.gt_inds)
        assert torch.equal(result.labels, single.labels)
        assert result.num_gts == single.num_gts


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('seed', range(4))
def test_agrees_with_mmdet_assigner(seed, dtype):
    preds, gts = random_case(
        30, 1 + 3 * seed, num_classes=7, seed=seed, dtype=dtype)
    ours = build_plugin_assigner()
    theirs = build_mmdet_assigner()
    for our_cost, their_cost in zip(ours.match_costs, theirs.match_costs):
        torch.testing.assert_close(
            our_cost(preds, gts, IMG_META), their_cost(preds, gts, IMG_META))
    ours_result = ours.assign(preds, gts, IMG_META)
    theirs_result = theirs.assign(preds, gts, IMG_META)
    assert torch.equal(ours_result.gt_inds, theirs_result.gt_inds)
    assert torch.equal(ours_result.labels, theirs_result.labels)


@pytest.mark.parametrize('box_format', ['xyxy', 'xywh'])
def test_bbox_l1_cost_agrees_with_mmdet_in_both_formats(box_format):
    preds, gts = random_case(6, 4, seed=5)
    ours = BBoxL1Cost(box_format=box_format, weight=3.0)
    with DefaultScope.overwrite_default_scope('mmdet'):
        theirs = MMDET_TASK_UTILS.build(
            dict(type='BBoxL1Cost', box_format=box_format, weight=3.0))
    torch.testing.assert_close(
        ours(preds, gts, IMG_META), theirs(preds, gts, IMG_META))


def test_focal_cost_prefers_the_confident_class():
    # Query 0 is confident in class 1, query 1 in class 0.
    scores = torch.tensor([[-5.0, 5.0], [5.0, -5.0]])
    preds = InstanceData(scores=scores, bboxes=torch.zeros(2, 4))
    gts = InstanceData(labels=torch.tensor([0, 1]), bboxes=torch.zeros(2, 4))
    cost = FocalLossCost()(preds, gts)
    assert cost[1, 0] < cost[0, 0] and cost[0, 1] < cost[1, 1]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_matched(dtype):
    preds, gts = random_case(12, 4, seed=6)
    half_preds = InstanceData(
        scores=preds.scores.to(dtype), bboxes=preds.bboxes.to(dtype))
    half_gts = InstanceData(labels=gts.labels, bboxes=gts.bboxes.to(dtype))
    result = build_plugin_assigner().assign(half_preds, half_gts, IMG_META)
    matched = result.gt_inds[result.gt_inds > 0] - 1
    assert sorted(matched.tolist()) == [0, 1, 2, 3]


def test_non_finite_cost_is_reported():
    preds, gts = random_case(4, 2)
    preds.scores[0, :] = float('nan')
    with pytest.raises(ValueError, match='NaN or infinite'):
        build_plugin_assigner().assign(preds, gts, IMG_META)


def test_bad_configurations_are_explained():
    with pytest.raises(ValueError, match='at least one match cost'):
        HungarianAssigner(match_costs=[])
    with pytest.raises(ValueError, match="'xyxy' or 'xywh'"):
        BBoxL1Cost(box_format='cxcywh')
    with pytest.raises(ValueError, match="'giou'"):
        IoUCost(iou_mode='diou')
    with pytest.raises(KeyError, match='img_shape'):
        preds, gts = random_case(3, 2)
        BBoxL1Cost()(preds, gts, img_meta=None)
