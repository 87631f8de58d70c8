"""Ground-truth labels outside the model's classes stop the assigner with
the label and num_classes, instead of an IndexError in a match cost (or, at
-1, a silent read of the last class's score)."""
import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

from ddetr_plugin.registry import TASK_UTILS

NUM_CLASSES = 2
MATCH_COSTS = [
    dict(type='FocalLossCost', weight=2.0),
    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
    dict(type='IoUCost', iou_mode='giou', weight=2.0)
]
IMG_META = dict(img_shape=(40, 60))


def _assigner():
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        return TASK_UTILS.build(
            dict(type='HungarianAssigner', match_costs=MATCH_COSTS))


def _case(labels):
    preds = InstanceData(
        scores=torch.randn(4, NUM_CLASSES),
        bboxes=torch.tensor([[0., 0., 10., 10.]]).repeat(4, 1))
    gts = InstanceData(
        labels=torch.tensor(labels),
        bboxes=torch.tensor([[1., 1., 9., 9.]]).repeat(len(labels), 1))
    return preds, gts


@pytest.mark.parametrize('bad_label', [2, 7, -1])
def test_label_outside_the_classes_names_label_and_num_classes(bad_label):
    good = _case([0, 1])
    bad = _case([1, bad_label])
    with pytest.raises(ValueError) as error:
        _assigner().assign_batch([good[0], bad[0]], [good[1], bad[1]],
                                 [IMG_META, IMG_META])
    message = str(error.value)
    assert f'ground-truth label {bad_label} is outside' in message
    assert f'bbox_head.num_classes={NUM_CLASSES}' in message
    assert 'labels 0 to 1' in message


def test_labels_inside_the_classes_are_matched():
    preds, gts = _case([0, 1])
    result = _assigner().assign(preds, gts, IMG_META)
    assert sorted(result.labels[result.gt_inds > 0].tolist()) == [0, 1]


def test_head_loss_reports_the_label():
    """Through the head, as a training step reaches it."""
    from mmdet.structures import DetDataSample

    from ddetr_plugin.registry import MODELS

    # The head's default train_cfg: the plugin's HungarianAssigner.
    head_cfg = dict(
        type='DeformableDETRHead',
        num_classes=NUM_CLASSES,
        embed_dims=8,
        num_pred_layer=1)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        head = MODELS.build(head_cfg)
    sample = DetDataSample(metainfo=dict(img_shape=(40, 60)))
    sample.gt_instances = InstanceData(
        labels=torch.tensor([3]), bboxes=torch.tensor([[1., 1., 9., 9.]]))
    hidden_states = torch.randn(1, 1, 5, 8)
    references = [torch.rand(1, 5, 2)] * 2
    with pytest.raises(ValueError, match='label 3 is outside'):
        head.loss(hidden_states, references, None, None, [sample])
