"""DeformableDETR: configs, variant flags, and the bad inputs users hit."""
import copy
import os.path as osp

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import CheckpointMismatchError, load_converted
from ddetr_plugin.registry import MODELS
from testkit import REPO

pytest.importorskip('scipy')

CONFIGS = osp.join(REPO, 'configs', 'deformable_detr')
BASE = 'deformable-detr_r50_16xb2-50e_coco.py'
REFINE = 'deformable-detr-refine_r50_16xb2-50e_coco.py'
TWO_STAGE = 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'


def tiny_cfg(variant=BASE, **model_options):
    """The variant's model config at CI size (ResNet-18, 1+1 layers)."""
    model = Config.fromfile(osp.join(CONFIGS, variant)).model
    model.num_queries = 20
    model.backbone.depth = 18
    model.backbone.init_cfg = None
    model.neck.in_channels = [128, 256, 512]
    model.transformer.encoder.num_layers = 1
    model.transformer.decoder.num_layers = 1
    model.update(model_options)
    return model


def build(cfg):
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        return MODELS.build(cfg)


def batch(model, sizes, boxes, training):
    """Images of the given sizes with the given ground truth per image."""
    inputs, samples = [], []
    for (height, width), image_boxes in zip(sizes, boxes):
        inputs.append(torch.randint(0, 256, (3, height, width)).byte())
        sample = DetDataSample(
            metainfo=dict(
                img_shape=(height, width),
                ori_shape=(height, width),
                scale_factor=(1.0, 1.0)))
        image_boxes = torch.tensor(
            image_boxes, dtype=torch.float32).reshape(-1, 4)
        sample.gt_instances = InstanceData(
            bboxes=image_boxes,
            labels=torch.zeros(len(image_boxes), dtype=torch.long))
        samples.append(sample)
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), training)


@pytest.mark.parametrize('variant, refine, two_stage',
                         [(BASE, False, False), (REFINE, True, False),
                          (TWO_STAGE, True, True)])
def test_configs_set_the_variant_and_the_head(variant, refine, two_stage):
    config = Config.fromfile(osp.join(CONFIGS, variant))
    assert config.default_scope == 'ddetr_plugin'
    assert config.custom_imports.imports == ['ddetr_plugin']
    assert config.optim_wrapper.optimizer.lr == 2e-4
    assert config.auto_scale_lr.base_batch_size == 32
    cfg = tiny_cfg(variant)
    cfg.transformer.decoder.num_layers = 2
    model = build(cfg)
    assert (model.with_box_refine, model.as_two_stage) == (refine, two_stage)
    head = model.bbox_head
    assert head.share_pred_layer is (not refine)
    assert head.num_pred_layer == 2 + int(two_stage)
    assert head.as_two_stage is two_stage
    shared = head.cls_branches[0] is head.cls_branches[-1]
    assert shared is (not refine)
    assert hasattr(model.transformer, 'query_embedding') is not two_stage


@pytest.mark.parametrize('variant', [BASE, REFINE, TWO_STAGE])
def test_loss_and_predict_run_and_learn(variant):
    model = build(tiny_cfg(variant, num_queries=10))
    model.train()
    data = batch(
        model, [(96, 128), (80, 100)],
        [[[10, 10, 60, 50], [20, 30, 100, 90]], []],
        training=True)
    losses = model(**data, mode='loss')
    total = sum(value for value in losses.values())
    assert torch.isfinite(total)
    total.backward()
    # The deformable attention of the encoder receives gradients.
    offsets = model.transformer.encoder.layers[0].self_attn.sampling_offsets
    assert offsets.weight.grad.abs().sum() > 0
    model.eval()
    data = batch(model, [(96, 128), (80, 100)], [[], []], training=False)
    with torch.no_grad():
        results = model(**data, mode='predict')
    for result in results:
        instances = result.pred_instances
        # test_cfg.max_per_img of the (query, class) pairs.
        assert len(instances) == 100
        assert torch.isfinite(instances.bboxes).all()


def test_image_smaller_than_the_coarsest_stride():
    # 20 px is less than the stride of the coarsest level (64): its feature
    # maps are 3x3, 2x2, 1x1 and 1x1. Alone or padded in a batch, it works.
    model = build(tiny_cfg(REFINE, num_queries=10)).eval()
    for sizes in ([(20, 20)], [(20, 20), (150, 90)]):
        data = batch(model, sizes, [[]] * len(sizes), training=False)
        with torch.no_grad():
            results = model(**data, mode='predict')
        boxes = results[0].pred_instances.bboxes
        assert torch.isfinite(boxes).all()
        # Rescaled boxes are clipped to the 20x20 image.
        assert boxes.min() >= 0 and boxes.max() <= 20
    model.train()
    data = batch(model, [(20, 20)], [[[2, 2, 15, 18]]], training=True)
    assert all(torch.isfinite(v) for v in model(**data, mode='loss').values())


def test_two_stage_small_image_error_says_what_to_change():
    model = build(tiny_cfg(TWO_STAGE, num_queries=20)).eval()
    data = batch(model, [(20, 20)], [[]], training=False)
    with pytest.raises(ValueError, match='lower num_queries'):
        model(**data, mode='predict')


def test_images_without_boxes_give_zero_box_losses():
    model = build(tiny_cfg(BASE, num_queries=10)).train()
    data = batch(model, [(64, 64), (64, 80)], [[], []], training=True)
    losses = model(**data, mode='loss')
    assert losses['loss_cls'] > 0
    assert losses['loss_bbox'] == 0 and losses['loss_iou'] == 0


def test_zero_width_boxes_give_finite_losses():
    model = build(tiny_cfg(REFINE, num_queries=10)).train()
    data = batch(
        model, [(64, 64)], [[[10, 10, 10, 40], [5, 5, 30, 5]]], training=True)
    losses = model(**data, mode='loss')
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            assert torch.isfinite(parameter.grad).all(), name


def test_num_feature_levels_must_agree_with_the_neck_and_attention():
    cfg = tiny_cfg(num_feature_levels=3)
    cfg.neck.num_outs = 4
    with pytest.raises(ValueError, match='model.neck.num_outs=4'):
        build(cfg)
    # Without an explicit num_outs the neck follows, but the attention
    # modules still say 4 levels.
    cfg = tiny_cfg(num_feature_levels=3)
    with pytest.raises(ValueError, match='num_feature_levels'):
        build(cfg)
    # Setting every place consistently works.
    cfg = tiny_cfg(num_feature_levels=3)
    cfg.transformer.encoder.layer_cfg.self_attn_cfg.num_levels = 3
    cfg.transformer.decoder.layer_cfg.cross_attn_cfg.num_levels = 3
    assert len(build(cfg).transformer.level_embed) == 3


def test_head_flags_that_contradict_the_detector_are_refused():
    cfg = tiny_cfg(REFINE)
    cfg.bbox_head.share_pred_layer = True
    with pytest.raises(ValueError, match='share_pred_layer=True contradicts'):
        build(cfg)
    cfg = tiny_cfg(BASE)
    cfg.bbox_head.share_pred_layer = True  # agrees: accepted
    assert build(cfg).bbox_head.share_pred_layer


def test_widths_must_agree():
    cfg = tiny_cfg()
    cfg.neck.out_channels = 128
    with pytest.raises(ValueError, match='same width'):
        build(cfg)


def test_num_classes_mismatch_with_a_checkpoint():
    trained = build(tiny_cfg())
    cfg = tiny_cfg()
    cfg.bbox_head.num_classes = 20
    model = build(cfg)
    with pytest.raises(CheckpointMismatchError, match='num_classes=80'):
        load_converted(model, copy.deepcopy(trained.state_dict()))


def test_forward_modes():
    model = build(tiny_cfg(num_queries=10)).eval()
    data = batch(model, [(64, 64)], [[]], training=False)
    with torch.no_grad():
        cls_scores, boxes = model(
            data['inputs'], data['data_samples'], mode='tensor')
    assert cls_scores.shape == (1, 1, 10, 80)
    assert boxes.shape == (1, 1, 10, 4)


def test_samples_without_batch_input_shape_are_explained():
    model = build(tiny_cfg(num_queries=10)).eval()
    sample = DetDataSample(metainfo=dict(img_shape=(64, 64)))
    with pytest.raises(ValueError, match='data_preprocessor'):
        model.predict(torch.zeros(1, 3, 64, 64), [sample])


def test_optimizer_recipe_slows_the_right_parameters():
    from mmengine.optim import build_optim_wrapper
    config = Config.fromfile(osp.join(CONFIGS, BASE))
    model = build(tiny_cfg())
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        wrapper = build_optim_wrapper(model, config.optim_wrapper)
    learning_rates = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in wrapper.optimizer.param_groups:
        for parameter in group['params']:
            learning_rates[names[id(parameter)]] = group['lr']
    slow = [
        'backbone.layer2.0.conv1.weight',
        'transformer.encoder.layers.0.self_attn.sampling_offsets.weight',
        'transformer.decoder.layers.0.cross_attn.sampling_offsets.bias',
        'transformer.reference_points_fc.weight'
    ]
    for name in slow:
        assert learning_rates[name] == pytest.approx(2e-5), name
    for name in ('transformer.encoder.layers.0.self_attn.value_proj.weight',
                 'transformer.level_embed', 'neck.projections.0.conv.weight',
                 'bbox_head.cls_branches.0.weight'):
        assert learning_rates[name] == pytest.approx(2e-4), name
    assert config.optim_wrapper.clip_grad.max_norm == 0.1
    assert config.param_scheduler[0].milestones == [40]
    assert config.train_cfg.max_epochs == 50
