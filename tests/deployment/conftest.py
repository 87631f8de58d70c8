"""Toy-sized detectors of the three variants for the deployment tests.

The models inherit the toy config and shrink it further (32 channels, one
encoder and two decoder layers: two layers are needed to catch a head that
uses the wrong layer's prediction branches). Their class branches get
larger random weights than the 1% prior of ``init_weights``, so that the
scores are spread and their ranking is not decided by rounding.
"""
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'deformable-detr_toy.py')
VARIANTS = {
    'plain': dict(with_box_refine=False, as_two_stage=False),
    'refine': dict(with_box_refine=True, as_two_stage=False),
    'two_stage': dict(with_box_refine=True, as_two_stage=True),
}
MAX_PER_IMG = 30


def model_config(variant: str) -> Config:
    """The toy model config of ``variant``, shrunk for tests."""
    model = Config.fromfile(TOY_CONFIG).model
    model.update(VARIANTS[variant])
    model.num_queries = 20
    model.backbone.base_channels = 8
    model.neck.update(in_channels=[16, 32, 64], out_channels=32, num_groups=8)
    attention = dict(embed_dims=32, num_heads=2)
    ffn = dict(embed_dims=32, feedforward_channels=64)
    model.transformer.encoder.num_layers = 1
    model.transformer.encoder.layer_cfg.self_attn_cfg.update(attention)
    model.transformer.encoder.layer_cfg.ffn_cfg.update(ffn)
    model.transformer.decoder.num_layers = 2
    model.transformer.decoder.layer_cfg.self_attn_cfg.update(attention)
    model.transformer.decoder.layer_cfg.cross_attn_cfg.update(attention)
    model.transformer.decoder.layer_cfg.ffn_cfg.update(ffn)
    model.transformer.positional_encoding.num_feats = 16
    model.bbox_head.embed_dims = 32
    model.test_cfg = dict(max_per_img=MAX_PER_IMG)
    return model


def build_model(variant: str) -> torch.nn.Module:
    """A seeded toy-sized detector of ``variant`` in eval mode."""
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        model = MODELS.build(model_config(variant))
    model.init_weights()
    with torch.no_grad():
        for branch in model.bbox_head.cls_branches:
            branch.weight.normal_(0.0, 1.0)
    return model.eval()


def predict(model: torch.nn.Module, images: torch.Tensor):
    """``model.predict`` on an unpadded batch, as ``(dets, labels)``.

    Args:
        model (nn.Module): The detector.
        images (Tensor): (bs, 3, h, w) normalised images.

    Returns:
        tuple[Tensor, Tensor]: (bs, k, 5) and (bs, k), boxes in pixels of
        ``images``.
    """
    height, width = images.shape[-2:]
    samples = [
        DetDataSample(
            metainfo=dict(
                img_shape=(height, width),
                ori_shape=(height, width),
                batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0))) for _ in range(len(images))
    ]
    with torch.no_grad():
        results = model.predict(images, samples, rescale=False)
    dets = torch.stack([
        torch.cat((result.pred_instances.bboxes,
                   result.pred_instances.scores[:, None]), -1)
        for result in results
    ])
    labels = torch.stack([result.pred_instances.labels for result in results])
    return dets, labels


def assert_same_detections(dets, labels, expected_dets, expected_labels):
    """Same labels, scores within 1e-4, boxes within 1e-2 px."""
    dets = torch.as_tensor(dets)
    labels = torch.as_tensor(labels)
    assert dets.shape == expected_dets.shape
    assert labels.dtype == torch.int64
    assert torch.equal(labels, expected_labels)
    torch.testing.assert_close(
        dets[..., 4], expected_dets[..., 4], atol=1e-4, rtol=0)
    torch.testing.assert_close(
        dets[..., :4], expected_dets[..., :4], atol=1e-2, rtol=0)


# (bs, h, w) the dynamic ONNX models run at: two sizes, the second a batch
# of two; neither is the size the models were traced with (2 x 96 x 128).
RUN_SHAPES = ((1, 72, 104), (2, 112, 80))


def assert_dynamic_onnx_matches(model, program, path: str,
                                sampling: str) -> None:
    """Write ``program`` as ONNX with ``sampling`` and check that ONNX
    Runtime gives ``model.predict``'s detections at :data:`RUN_SHAPES`,
    sorted by score, with named dynamic axes."""
    from ddetr_plugin.deployment import example_images
    from ddetr_plugin.deployment.onnx_export import (check_onnx_file,
                                                     export_onnx_program)
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    export_onnx_program(program, path, sampling=sampling)
    check_onnx_file(path)
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.metadata['sampling'] == sampling
    # The dynamic axes carry their names, in the input and the outputs.
    assert detector.input_shape == ('batch', 3, 'height', 'width')
    output_shapes = [
        tuple(output.shape) for output in detector.session.get_outputs()
    ]
    assert output_shapes == [('batch', MAX_PER_IMG, 5), ('batch', MAX_PER_IMG)]
    for seed, (batch_size, height, width) in enumerate(RUN_SHAPES):
        images = example_images(height, width, batch_size, seed=seed + 1)
        dets, labels = detector(images)
        assert dets.shape == (batch_size, MAX_PER_IMG, 5)
        assert_same_detections(dets, labels, *predict(model, images))
        # Sorted by score, as mmdet's predict.
        scores = torch.from_numpy(dets[..., 4])
        assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.fixture(scope='session')
def dynamic_program():
    """``dynamic_program(variant)``: the toy-sized model of ``variant`` and
    its ``torch.export`` program with dynamic batch, height and width,
    traced at 2 x 96 x 128.

    Exporting is the slow part of these tests (about 20 s a variant on two
    cores, most of it torch.export's symbolic tracing), so each variant is
    exported once per test session (per xdist worker) and shared by the
    tests of a file.
    """
    from ddetr_plugin.deployment import example_images, export_detector
    programs = {}

    def get(variant: str):
        if variant not in programs:
            model = build_model(variant)
            programs[variant] = (model,
                                 export_detector(
                                     model,
                                     example_images(96, 128, batch_size=2),
                                     dynamic=True))
        return programs[variant]

    return get


@pytest.fixture(scope='session')
def toy() -> SimpleNamespace:
    """The helpers above, for test modules (which cannot import this
    conftest under ``--import-mode=importlib``)."""
    return SimpleNamespace(
        repo=REPO,
        toy_config=TOY_CONFIG,
        variants=tuple(VARIANTS),
        max_per_img=MAX_PER_IMG,
        model_config=model_config,
        build_model=build_model,
        predict=predict,
        assert_same_detections=assert_same_detections,
        assert_dynamic_onnx_matches=assert_dynamic_onnx_matches)
