"""Capturing the deformable attention's sampling, and its pixel geometry.

A small Deformable DETR (ResNet-18, one encoder and two decoder layers) of
each variant runs on a padded batch. The capture must hold exactly what the
op received and leave the model's outputs untouched; the query behind each
detection must be the model's; points placed by hand-set weights must land
at the pixels their feature-map offsets predict.
"""
import math
import os.path as osp

import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin  # noqa: F401
from ddetr_plugin.models.layers import ms_deform_attn as attention_module
from ddetr_plugin.registry import MODELS
from ddetr_plugin.visualization import (AttentionCapture, Probe,
                                        detection_queries, encoder_query_index,
                                        query_points, select_detections)
from ddetr_plugin.visualization.drawing import draw_encoder_query
from testkit import REPO

CONFIGS = osp.join(REPO, 'configs', 'deformable_detr')
VARIANTS = {
    'plain': 'deformable-detr_r50_16xb2-50e_coco.py',
    'refine': 'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'two-stage': 'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
}
# Input sizes (h, w), multiples of the coarsest stride (64), so that every
# level's map is exactly the input divided by its stride. The first image
# is padded to the second's height.
SIZES = [(128, 192), (192, 192)]
STRIDES = (8, 16, 32, 64)
# Each input is the original image shrunk by half.
SCALE = 0.5


def build(variant):
    model = Config.fromfile(osp.join(CONFIGS, VARIANTS[variant])).model
    model.num_queries = 10
    model.backbone.depth = 18
    model.backbone.init_cfg = None
    model.neck.in_channels = [128, 256, 512]
    model.transformer.encoder.num_layers = 1
    model.transformer.decoder.num_layers = 2
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        return MODELS.build(model).eval()


def padded_batch(model, sizes=SIZES, scale_factor=(SCALE, SCALE)):
    """Random images of ``sizes`` (h, w), each the original image resized
    by ``scale_factor`` (w_scale, h_scale), padded into one batch."""
    scale_x, scale_y = scale_factor
    inputs, samples = [], []
    torch.manual_seed(1)
    for height, width in sizes:
        inputs.append(torch.randint(0, 256, (3, height, width)).byte())
        samples.append(
            DetDataSample(
                metainfo=dict(
                    img_shape=(height, width),
                    ori_shape=(round(height / scale_y),
                               round(width / scale_x)),
                    scale_factor=(scale_x, scale_y))))
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), False)


def attentions(model):
    """Every deformable attention, named in the order the model calls
    them."""
    transformer = model.transformer
    named = {
        f'encoder{index}': layer.self_attn
        for index, layer in enumerate(transformer.encoder.layers)
    }
    named.update({
        f'decoder{index}': layer.cross_attn
        for index, layer in enumerate(transformer.decoder.layers)
    })
    return named


def valid_ratios_of(model, data):
    """The valid ratios the decoder receives, (bs, num_levels, 2)."""
    seen = {}

    def keep(module, args):
        seen['ratios'] = args[7]

    handle = model.transformer.decoder.register_forward_pre_hook(keep)
    with torch.no_grad():
        model.test_step(data)
    handle.remove()
    return seen['ratios']


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_capture_holds_what_the_op_received_and_changes_nothing(
        variant, monkeypatch):
    model = build(variant)
    data = padded_batch(model)
    with torch.no_grad():
        plain = model.test_step(data)
    received = []
    op = attention_module.ms_deform_attn

    def recording_op(value, spatial_shapes, level_start_index,
                     sampling_locations, attention_weights):
        received.append(
            (sampling_locations.clone(), attention_weights.clone()))
        return op(value, spatial_shapes, level_start_index, sampling_locations,
                  attention_weights)

    monkeypatch.setattr(attention_module, 'ms_deform_attn', recording_op)
    modules = attentions(model)
    with AttentionCapture(modules) as capture, torch.no_grad():
        captured = model.test_step(data)
    # One op call per module, in the order of ``attentions``.
    assert len(received) == len(modules)
    for (name, records), (locations, weights) in zip(capture.records.items(),
                                                     received):
        assert len(records) == 1, name
        assert torch.equal(records[0].sampling_locations, locations), name
        assert torch.equal(records[0].attention_weights, weights), name
    # The model's outputs are the same numbers with the capture on.
    for before, after in zip(plain, captured):
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(before.pred_instances[key],
                               after.pred_instances[key]), key
    # Closing the block removes every hook.
    for module in modules.values():
        assert not module._forward_hooks
        assert not module.attention_weights._forward_pre_hooks


def test_capture_refuses_other_modules():
    with pytest.raises(TypeError, match='Linear'):
        AttentionCapture(dict(wrong=torch.nn.Linear(2, 2)))


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_detection_queries_match_the_models_detections(variant):
    model = build(variant)
    data = padded_batch(model)
    seen = {}

    def keep(module, args, output):
        seen['outputs'] = output

    handle = model.bbox_head.register_forward_hook(keep)
    with torch.no_grad():
        results = model.test_step(data)
    handle.remove()
    all_cls_scores, all_bbox_preds = seen['outputs']
    max_per_img = model.test_cfg['max_per_img']
    for index, result in enumerate(results):
        scores, labels, queries = detection_queries(all_cls_scores[-1, index],
                                                    max_per_img)
        instances = result.pred_instances
        assert torch.equal(scores, instances.scores)
        assert torch.equal(labels, instances.labels)
        # The query's box, scaled as the head scales it, is the detection.
        height, width = result.img_shape
        cx, cy, w, h = all_bbox_preds[-1, index, queries].unbind(-1)
        boxes = torch.stack(((cx - w / 2) * width, (cy - h / 2) * height,
                             (cx + w / 2) * width, (cy + h / 2) * height), -1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        torch.testing.assert_close(boxes / SCALE, instances.bboxes)


def set_offsets(attention, offsets):
    """Make every query's offsets ``offsets`` (num_heads, num_levels,
    num_points, 2), whatever the query."""
    with torch.no_grad():
        attention.sampling_offsets.weight.zero_()
        attention.sampling_offsets.bias.copy_(offsets.reshape(-1))


def known_offsets(attention):
    """Offset (k, -k) * (head + 1) for point k: distinct per head, point."""
    heads = torch.arange(1, attention.num_heads + 1, dtype=torch.float32)
    points = torch.arange(attention.num_points, dtype=torch.float32)
    step = heads[:, None] * points[None, :]
    offsets = torch.stack((step, -step),
                          -1)[:, None].expand(-1, attention.num_levels, -1, -1)
    return offsets.contiguous()


def plain_model_with_known_points(reference):
    """The plain variant whose every query has ``reference`` (2,) (x, y)
    relative to the unpadded image, and the last decoder layer's attention
    with :func:`known_offsets`; returns (model, attention, offsets)."""
    model = build('plain')
    with torch.no_grad():
        model.transformer.reference_points_fc.weight.zero_()
        model.transformer.reference_points_fc.bias.copy_(
            torch.log(reference / (1 - reference)))
    attention = model.transformer.decoder.layers[-1].cross_attn
    offsets = known_offsets(attention)
    set_offsets(attention, offsets)
    return model, attention, offsets


def test_point_references_land_at_stride_multiples():
    # Plain variant: the reference is a point, the offsets are in pixels of
    # each level's map, one of which is STRIDES[level] input pixels.
    reference = torch.tensor([0.25, 0.625])
    model, attention, offsets = plain_model_with_known_points(reference)
    data = padded_batch(model)
    ratios = valid_ratios_of(model, data)
    # The first image is padded: its valid height is 2/3 of the batch's.
    assert torch.allclose(ratios[0, :, 1], torch.full((4, ), 2 / 3))
    with AttentionCapture(dict(last=attention)) as capture, torch.no_grad():
        results = model.test_step(data)
    record = capture.records['last'][0]
    strides = torch.tensor(STRIDES, dtype=torch.float64)
    for index, result in enumerate(results):
        height, width = result.img_shape
        expected_reference = reference.double() * torch.tensor([width, height
                                                                ]) / SCALE
        for query in (0, 7):
            points = query_points(record, index, query, ratios[index],
                                  result.metainfo)
            torch.testing.assert_close(
                points.reference, expected_reference, atol=1e-3, rtol=0)
            expected = expected_reference + offsets.double() * \
                strides[None, :, None, None] / SCALE
            torch.testing.assert_close(
                points.points, expected, atol=1e-3, rtol=0)
            assert torch.allclose(
                points.weights.sum((1, 2)),
                torch.ones(attention.num_heads, dtype=torch.float64))


def test_anisotropic_resize_maps_points_to_original_pixels(tmp_path):
    # Non-square originals resized without keeping the ratio: x by 1/2, y
    # by 1/4 (keep_ratio=False). The first image is padded in both
    # directions.
    scale_x, scale_y = 0.5, 0.25
    sizes = [(128, 192), (192, 256)]
    reference = torch.tensor([0.25, 0.625])
    model, attention, offsets = plain_model_with_known_points(reference)
    data = padded_batch(model, sizes, (scale_x, scale_y))
    ratios = valid_ratios_of(model, data)
    with AttentionCapture(dict(last=attention)) as capture, torch.no_grad():
        results = model.test_step(data)
    record = capture.records['last'][0]
    # Original pixels per input pixel, (x, y); one map pixel of a level is
    # STRIDES[level] input pixels.
    per_input_pixel = torch.tensor([1 / scale_x, 1 / scale_y],
                                   dtype=torch.float64)
    strides = torch.tensor(STRIDES, dtype=torch.float64)
    for index, (height, width) in enumerate(sizes):
        original_height, original_width = height / scale_y, width / scale_x
        expected_reference = reference.double() * torch.tensor(
            [original_width, original_height], dtype=torch.float64)
        expected = expected_reference + offsets.double() * \
            strides[None, :, None, None] * per_input_pixel
        points = query_points(record, index, 3, ratios[index],
                              results[index].metainfo)
        torch.testing.assert_close(
            points.reference, expected_reference, atol=1e-3, rtol=0)
        torch.testing.assert_close(points.points, expected, atol=1e-3, rtol=0)
        # The count the pictures report, against the expected points.
        x, y = expected[..., 0], expected[..., 1]
        expected_outside = int(((x < 0) | (x > original_width) | (y < 0)
                                | (y > original_height)).sum())
        assert 0 < expected_outside < x.numel()
        image = np.zeros((int(original_height), int(original_width), 3),
                         np.uint8)
        drawn_outside = draw_encoder_query(image, points, (0, 0), 0, 0,
                                           str(tmp_path / f'{index}.png'))
        assert drawn_outside == expected_outside


@pytest.mark.parametrize('variant', ['refine', 'two-stage'])
def test_box_references_put_points_on_the_box(variant):
    # With refinement the second layer's reference is the first layer's
    # box, and an offset of num_points is half the box's size: points land
    # on the corners of the reference box, which is the first layer's
    # predicted box in pixels.
    model = build(variant)
    attention = model.transformer.decoder.layers[1].cross_attn
    corners = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]
                            ]) * attention.num_points
    offsets = corners[torch.arange(attention.num_points) % 4]
    set_offsets(
        attention, offsets[None, None].expand(attention.num_heads,
                                              attention.num_levels, -1, -1))
    data = padded_batch(model)
    ratios = valid_ratios_of(model, data)
    seen = {}

    def keep(module, args, output):
        seen['boxes'] = output[1]

    handle = model.bbox_head.register_forward_hook(keep)
    with AttentionCapture(dict(second=attention)) as capture, \
            torch.no_grad():
        results = model.test_step(data)
    handle.remove()
    record = capture.records['second'][0]
    for index, result in enumerate(results):
        height, width = result.img_shape
        size = torch.tensor([width, height] * 2, dtype=torch.float64) / SCALE
        for query in (0, 9):
            points = query_points(record, index, query, ratios[index],
                                  result.metainfo)
            cx, cy, w, h = seen['boxes'][0, index, query].double()
            first_layer_box = torch.stack(
                (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)) * size
            torch.testing.assert_close(
                points.reference, first_layer_box, atol=1e-3, rtol=0)
            x1, y1, x2, y2 = points.reference
            expected = torch.stack(
                (torch.where(offsets[:, 0] > 0, x2,
                             x1), torch.where(offsets[:, 1] > 0, y2, y1)), -1)
            torch.testing.assert_close(
                points.points,
                expected[None, None].expand_as(points.points),
                atol=1e-3,
                rtol=0)


def test_encoder_pixel_finds_its_cell_on_the_padded_image():
    model = build('plain')
    attention = model.transformer.encoder.layers[0].self_attn
    offsets = known_offsets(attention)
    set_offsets(attention, offsets)
    data = padded_batch(model)
    ratios = valid_ratios_of(model, data)
    with AttentionCapture(dict(encoder=attention)) as capture, \
            torch.no_grad():
        results = model.test_step(data)
    record = capture.records['encoder'][0]
    meta = results[0].metainfo
    pixel = (201.0, 250.0)  # original pixels of the padded first image
    strides = torch.tensor(STRIDES, dtype=torch.float64)
    for level, stride in enumerate(STRIDES):
        index = encoder_query_index(pixel, level, record, 0, ratios[0], meta)
        # The cell holding the pixel, in the level's own (padded) map.
        cell = stride / SCALE
        column, row = math.floor(pixel[0] / cell), math.floor(pixel[1] / cell)
        map_width = SIZES[1][1] // stride
        start = int(record.level_start_index[level])
        assert index == start + row * map_width + column
        points = query_points(record, 0, index, ratios[0], meta)
        centre = torch.tensor([(column + 0.5) * cell, (row + 0.5) * cell],
                              dtype=torch.float64)
        torch.testing.assert_close(points.reference, centre, atol=1e-3, rtol=0)
        torch.testing.assert_close(
            points.points,
            centre + offsets.double() * strides[None, :, None, None] / SCALE,
            atol=1e-3,
            rtol=0)
    with pytest.raises(ValueError, match='outside the image'):
        encoder_query_index((10.0, 300.0), 0, record, 0, ratios[0], meta)
    with pytest.raises(ValueError, match='level 4 is out of range'):
        encoder_query_index(pixel, 4, record, 0, ratios[0], meta)


def test_select_detections_refuses_a_ranking_it_cannot_reproduce():
    # Logits of 3 queries x 2 classes; the head would keep (query 1,
    # class 0) first, then (query 2, class 1).
    logits = torch.tensor([[-3.0, -2.0], [2.0, -1.0], [-4.0, 1.0]])
    scores, labels, queries = detection_queries(logits, 2)
    assert queries.tolist() == [1, 2] and labels.tolist() == [0, 1]
    result = DetDataSample()
    result.pred_instances = InstanceData(
        scores=scores,
        labels=labels,
        bboxes=torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    probe = Probe(
        result=result,
        decoder=None,
        encoder=None,
        valid_ratios=torch.ones(4, 2),
        cls_scores=logits,
        decoder_layer=0,
        encoder_layer=None)
    kept = select_detections(probe, 2, score_thr=0.5, max_dets=5)
    # Scores sigmoid(2) = 0.88 and sigmoid(1) = 0.73: both pass 0.5, only
    # the first passes 0.8.
    assert [(d.query, d.label) for d in kept] == [(1, 0), (2, 1)]
    assert kept[1].box.tolist() == [5.0, 6.0, 7.0, 8.0]
    assert len(select_detections(probe, 2, score_thr=0.8, max_dets=5)) == 1
    # A head that ranked otherwise (other labels) is refused, not guessed.
    result.pred_instances.labels = labels.flip(0)
    with pytest.raises(RuntimeError, match='did not reproduce'):
        select_detections(probe, 2, score_thr=0.0, max_dets=5)
