"""Deformable DETR head: parity with MMDetection 3.3.0 and its semantics."""
import copy

import pytest
import torch
from mmdet.models.dense_heads import detr_head
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.structures import DetDataSample
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData
from torch import nn

from ddetr_plugin.models.dense_heads import (DeformableDETRHead,
                                             set_prediction_head)
from ddetr_plugin.models.task_modules import HungarianAssigner
from ddetr_plugin.registry import MODELS

NUM_CLASSES = 6
EMBED_DIMS = 32
NUM_LAYERS = 6
NUM_QUERIES = 25
NUM_FEAT_POINTS = 40
VARIANTS = {
    'plain': dict(share_pred_layer=True, num_pred_layer=6),
    'refine': dict(share_pred_layer=False, num_pred_layer=6),
    'two-stage':
    dict(share_pred_layer=False, num_pred_layer=7, as_two_stage=True),
}
IMAGE_SHAPES = [(48, 64), (40, 56)]  # (height, width) inside the batch
SCALE_FACTORS = [(0.5, 0.5), (1.25, 0.8)]  # (w_scale, h_scale)


def head_config(variant: str, sync_cls_avg_factor: bool = False) -> dict:
    return dict(
        type='DeformableDETRHead',
        num_classes=NUM_CLASSES,
        embed_dims=EMBED_DIMS,
        sync_cls_avg_factor=sync_cls_avg_factor,
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0),
        train_cfg=dict(
            assigner=dict(
                type='HungarianAssigner',
                match_costs=[
                    dict(type='FocalLossCost', weight=2.0),
                    dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                    dict(type='IoUCost', iou_mode='giou', weight=2.0)
                ])),
        test_cfg=dict(max_per_img=40),
        **VARIANTS[variant])


def build_heads(variant: str, sync_cls_avg_factor: bool = False, seed=0):
    """The plugin's head and mmdet's, with the same random weights."""
    config = head_config(variant, sync_cls_avg_factor)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        ours = MODELS.build(copy.deepcopy(config))
    with DefaultScope.overwrite_default_scope('mmdet'):
        theirs = MMDET_MODELS.build(copy.deepcopy(config))
    torch.manual_seed(seed)
    for parameter in theirs.parameters():
        nn.init.normal_(parameter, std=0.3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def random_boxes(num: int, height: int, width: int,
                 generator: torch.Generator) -> torch.Tensor:
    corners = torch.rand(num, 2, generator=generator) * 0.6
    sizes = torch.rand(num, 2, generator=generator) * 0.35 + 0.05
    boxes = torch.cat([corners, corners + sizes], dim=1)
    return boxes * torch.tensor([width, height, width, height])


def make_samples(num_gts=(3, 5), seed=0) -> list:
    generator = torch.Generator().manual_seed(seed + 100)
    samples = []
    for count, shape, scale in zip(num_gts, IMAGE_SHAPES, SCALE_FACTORS):
        sample = DetDataSample(
            metainfo=dict(
                img_shape=shape,
                ori_shape=(round(shape[0] / scale[1]),
                           round(shape[1] / scale[0])),
                scale_factor=scale))
        sample.gt_instances = InstanceData(
            bboxes=random_boxes(count, *shape, generator),
            labels=torch.randint(NUM_CLASSES, (count, ), generator=generator))
        samples.append(sample)
    return samples


def make_inputs(variant: str, seed=0):
    """hidden_states, references, enc_outputs_class, enc_outputs_coord."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = len(IMAGE_SHAPES)
    hidden_states = torch.randn(
        NUM_LAYERS, batch_size, NUM_QUERIES, EMBED_DIMS, generator=generator)
    two_stage = variant == 'two-stage'
    initial_dims = 4 if two_stage else 2
    later_dims = 2 if variant == 'plain' else 4
    references = [
        torch.rand(batch_size, NUM_QUERIES, initial_dims, generator=generator)
    ] + [
        torch.rand(batch_size, NUM_QUERIES, later_dims, generator=generator)
        for _ in range(NUM_LAYERS)
    ]
    enc_class = enc_coord = None
    if two_stage:
        enc_class = torch.randn(
            batch_size, NUM_FEAT_POINTS, NUM_CLASSES, generator=generator)
        enc_coord = torch.rand(
            batch_size, NUM_FEAT_POINTS, 4, generator=generator) * 0.8 + 0.1
    return hidden_states, references, enc_class, enc_coord


def run_loss(head, variant, num_gts=(3, 5), seed=0):
    """Losses of ``head`` and the gradient of their sum w.r.t. the inputs."""
    hidden_states, references, enc_class, enc_coord = make_inputs(
        variant, seed)
    hidden_states.requires_grad_(True)
    if enc_class is not None:
        enc_class.requires_grad_(True)
    losses = head.loss(hidden_states, references, enc_class, enc_coord,
                       make_samples(num_gts, seed))
    sum(loss.sum() for loss in losses.values()).backward()
    gradients = [hidden_states.grad]
    if enc_class is not None:
        gradients.append(enc_class.grad)
    return losses, gradients


def test_registered_in_plugin_scope_without_replacing_mmdet():
    assert MODELS.get('DeformableDETRHead') is DeformableDETRHead
    assert MMDET_MODELS.get('DeformableDETRHead') is not DeformableDETRHead
    ours, theirs = build_heads('plain')
    assert isinstance(ours.assigner, HungarianAssigner)
    assert not isinstance(theirs.assigner, HungarianAssigner)


@pytest.mark.parametrize('sync_cls_avg_factor', [False, True])
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_losses_and_gradients_equal_mmdet(variant, sync_cls_avg_factor):
    ours, theirs = build_heads(variant, sync_cls_avg_factor)
    our_losses, our_gradients = run_loss(ours, variant)
    their_losses, their_gradients = run_loss(theirs, variant)

    expected_keys = {'loss_cls', 'loss_bbox', 'loss_iou'} | {
        f'd{layer}.{name}'
        for layer in range(NUM_LAYERS - 1)
        for name in ('loss_cls', 'loss_bbox', 'loss_iou')
    }
    if variant == 'two-stage':
        expected_keys |= {'enc_loss_cls', 'enc_loss_bbox', 'enc_loss_iou'}
    assert set(our_losses) == set(their_losses) == expected_keys
    for key, value in our_losses.items():
        assert value.dim() == 0, key
        torch.testing.assert_close(
            value, their_losses[key].reshape(()), rtol=1e-4, atol=1e-6)
    for our_gradient, their_gradient in zip(our_gradients, their_gradients):
        torch.testing.assert_close(
            our_gradient, their_gradient, rtol=1e-4, atol=1e-6)


def test_mmdet_assigner_in_the_plugin_head_gives_the_same_losses():
    # An assigner without assign_batch or matched pairs (mmdet's) goes
    # through the per-image fallback.
    config = head_config('two-stage')
    assigner = config['train_cfg']['assigner']
    assigner['type'] = 'mmdet.HungarianAssigner'
    for cost in assigner['match_costs']:
        cost['type'] = 'mmdet.' + cost['type']
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        fallback = MODELS.build(config)
    assert not isinstance(fallback.assigner, HungarianAssigner)
    ours, theirs = build_heads('two-stage')
    fallback.load_state_dict(theirs.state_dict())
    fallback_losses, _ = run_loss(fallback, 'two-stage')
    their_losses, _ = run_loss(theirs, 'two-stage')
    for key, value in fallback_losses.items():
        torch.testing.assert_close(
            value, their_losses[key].reshape(()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('sync_cls_avg_factor', [False, True])
def test_distributed_normalisation_equals_mmdet(monkeypatch,
                                                sync_cls_avg_factor):
    # Stand-in for an all-reduce where the other processes hold 2.5 times
    # as many objects: only the normalisers that mmdet averages over
    # processes may change.
    def fake_reduce_mean(tensor):
        return tensor * 2.5

    monkeypatch.setattr(set_prediction_head, 'reduce_mean', fake_reduce_mean)
    monkeypatch.setattr(detr_head, 'reduce_mean', fake_reduce_mean)
    ours, theirs = build_heads('two-stage', sync_cls_avg_factor)
    our_losses, _ = run_loss(ours, 'two-stage')
    their_losses, _ = run_loss(theirs, 'two-stage')
    for key, value in our_losses.items():
        torch.testing.assert_close(
            value, their_losses[key].reshape(()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('variant', ['refine', 'two-stage'])
def test_image_without_ground_truth_in_a_batch_equals_mmdet(variant):
    ours, theirs = build_heads(variant)
    our_losses, _ = run_loss(ours, variant, num_gts=(0, 4), seed=3)
    their_losses, _ = run_loss(theirs, variant, num_gts=(0, 4), seed=3)
    for key, value in our_losses.items():
        torch.testing.assert_close(
            value, their_losses[key].reshape(()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_empty_ground_truth_gives_zero_box_loss_and_positive_cls_loss(variant):
    ours, _ = build_heads(variant)
    losses, gradients = run_loss(ours, variant, num_gts=(0, 0))
    for key, value in losses.items():
        if key.endswith('loss_cls'):
            assert value.item() > 0, key
        else:
            assert value.item() == 0, key
    assert torch.isfinite(gradients[0]).all()


@pytest.mark.parametrize('rescale', [True, False])
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_predictions_equal_mmdet(variant, rescale):
    ours, theirs = build_heads(variant, seed=1)
    hidden_states, references, _, _ = make_inputs(variant, seed=1)
    samples = make_samples()
    with torch.no_grad():
        our_results = ours.predict(hidden_states, references, samples, rescale)
        their_results = theirs.predict(hidden_states, references, samples,
                                       rescale)
    for sample, our, their in zip(samples, our_results, their_results):
        assert len(our) == 40
        assert torch.equal(our.labels, their.labels)
        torch.testing.assert_close(our.scores, their.scores)
        torch.testing.assert_close(our.bboxes, their.bboxes)
        height, width = sample.img_shape
        if rescale:
            w_scale, h_scale = sample.scale_factor
            height, width = height / h_scale, width / w_scale
        assert (our.bboxes[:, 0::2] <= width + 1e-4).all()
        assert (our.bboxes[:, 1::2] <= height + 1e-4).all()
        assert (our.bboxes >= 0).all()
        assert (our.scores[:-1] >= our.scores[1:]).all()


def test_forward_refines_references_in_inverse_sigmoid_space():
    ours, _ = build_heads('refine')
    for reg_branch in ours.reg_branches:
        nn.init.zeros_(reg_branch[-1].weight)
        nn.init.zeros_(reg_branch[-1].bias)
    hidden_states, references, _, _ = make_inputs('refine')
    references[0] = references[0].clamp(0.05, 0.95)
    references[1] = references[1].clamp(0.05, 0.95)
    _, boxes = ours(hidden_states, references)
    assert boxes.shape == (NUM_LAYERS, 2, NUM_QUERIES, 4)
    # Zero delta: a point reference gives its centre and sigmoid(0) sizes,
    # a box reference gives the box itself.
    torch.testing.assert_close(boxes[0, ..., :2], references[0])
    torch.testing.assert_close(boxes[0, ..., 2:],
                               torch.full_like(boxes[0, ..., 2:], 0.5))
    torch.testing.assert_close(boxes[1], references[1])


def test_shared_and_separate_branches():
    plain, _ = build_heads('plain')
    refine, _ = build_heads('refine')
    two_stage, _ = build_heads('two-stage')
    assert len({id(branch) for branch in plain.cls_branches}) == 1
    assert len({id(branch) for branch in plain.reg_branches}) == 1
    assert len({id(branch) for branch in refine.cls_branches}) == 6
    assert len(two_stage.cls_branches) == len(two_stage.reg_branches) == 7


def test_init_weights_start_from_prior_and_references():
    for variant in VARIANTS:
        head, _ = build_heads(variant)
        head.init_weights()
        for cls_branch in head.cls_branches:
            expected = -torch.log(torch.tensor((1 - 0.01) / 0.01))
            torch.testing.assert_close(cls_branch.bias,
                                       expected.expand_as(cls_branch.bias))
        for index, reg_branch in enumerate(head.reg_branches):
            assert not reg_branch[-1].weight.any()
            size_bias = reg_branch[-1].bias[2:]
            if index == 0 and variant != 'two-stage':
                assert (size_bias == -2).all()
            elif variant != 'plain':
                assert not size_bias.any()


def test_checkpoint_with_other_class_count_is_explained():
    head, _ = build_heads('refine')
    state_dict = head.state_dict()
    for index in range(6):
        state_dict[f'cls_branches.{index}.weight'] = torch.zeros(
            91, EMBED_DIMS)
        state_dict[f'cls_branches.{index}.bias'] = torch.zeros(91)
    with pytest.raises(RuntimeError) as error:
        head.load_state_dict(state_dict)
    message = str(error.value)
    assert 'classifies 91 classes' in message
    assert f'num_classes={NUM_CLASSES}' in message
    assert 'official_to_plugin.py' in message


def test_bad_inputs_are_explained():
    head, _ = build_heads('refine')
    hidden_states, references, _, _ = make_inputs('refine')
    with pytest.raises(ValueError, match='need one reference per decoder'):
        head(hidden_states, references[:3])
    bad_references = list(references)
    bad_references[2] = references[2][..., :3]
    with pytest.raises(ValueError, match='must end in 2'):
        head(hidden_states, bad_references)
    with pytest.raises(ValueError, match='prediction layers'):
        head(torch.cat([hidden_states, hidden_states]), references * 2)
    with pytest.raises(ValueError, match=r'\(num_layers, bs, num_queries'):
        head(hidden_states[0], references)
    samples = make_samples()
    for sample in samples:
        sample.set_metainfo(dict(scale_factor=None))
    with pytest.raises(KeyError, match='scale_factor'):
        head.predict(hidden_states, references, samples, rescale=True)


def test_bad_configurations_are_explained():
    config = head_config('plain')
    config.pop('type')
    softmax = copy.deepcopy(config)
    softmax['loss_cls'] = dict(
        type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        with pytest.raises(ValueError, match='use_sigmoid=True'):
            DeformableDETRHead(**softmax)
        no_assigner = copy.deepcopy(config)
        no_assigner['train_cfg'] = dict(sampler=None)
        with pytest.raises(KeyError, match='assigner'):
            DeformableDETRHead(**no_assigner)
        with pytest.raises(ValueError, match='num_classes'):
            DeformableDETRHead(**dict(config, num_classes=0))
