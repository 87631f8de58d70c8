"""Toy-sized detectors of the three variants for the deployment tests.

The models inherit the toy config and shrink it further (32 channels, one
encoder and two decoder layers: two layers are needed to catch a head that
uses the wrong layer's prediction branches). Their class branches are
redrawn (weights of std 1/sqrt(embed_dims), no bias) so that the kept
scores spread over (0, 1) instead of the 1% prior of ``init_weights`` or
the saturation of larger weights: label and order equality then do not
rest on near-ties (``test_toy_models.py`` asserts the spread).
"""
import contextlib
import importlib.util
import io
import os.path as osp
import re
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
EMBED_DIMS = 32


def model_config(variant: str) -> Config:
    """The toy model config of ``variant``, shrunk for tests."""
    model = Config.fromfile(TOY_CONFIG).model
    model.update(VARIANTS[variant])
    model.num_queries = 20
    model.backbone.base_channels = 8
    model.neck.update(
        in_channels=[16, 32, 64], out_channels=EMBED_DIMS, num_groups=8)
    attention = dict(embed_dims=EMBED_DIMS, num_heads=2)
    ffn = dict(embed_dims=EMBED_DIMS, feedforward_channels=2 * EMBED_DIMS)
    model.transformer.encoder.num_layers = 1
    model.transformer.encoder.layer_cfg.self_attn_cfg.update(attention)
    model.transformer.encoder.layer_cfg.ffn_cfg.update(ffn)
    model.transformer.decoder.num_layers = 2
    model.transformer.decoder.layer_cfg.self_attn_cfg.update(attention)
    model.transformer.decoder.layer_cfg.cross_attn_cfg.update(attention)
    model.transformer.decoder.layer_cfg.ffn_cfg.update(ffn)
    model.transformer.positional_encoding.num_feats = EMBED_DIMS // 2
    model.bbox_head.embed_dims = EMBED_DIMS
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
            # Logits of about unit spread: the hidden states are
            # layer-normalised, so each of the EMBED_DIMS terms is ~1.
            branch.weight.normal_(0.0, EMBED_DIMS**-0.5)
            branch.bias.zero_()
    return model.eval()


def padded_images(image_shapes, height: int, width: int,
                  seed: int) -> torch.Tensor:
    """Random normalised images, each at the top left of a ``height`` x
    ``width`` batch and zero beyond, as the data preprocessor pads.

    Args:
        image_shapes (list[tuple[int, int]]): (h, w) of each image.
        height (int): Padded height.
        width (int): Padded width.
        seed (int): Seed of the values.

    Returns:
        Tensor: (len(image_shapes), 3, height, width).
    """
    from ddetr_plugin.deployment import example_images
    images = example_images(height, width, len(image_shapes), seed=seed)
    for image, (image_height, image_width) in zip(images, image_shapes):
        image[:, image_height:] = 0
        image[:, :, image_width:] = 0
    return images


def predict(model: torch.nn.Module, images: torch.Tensor, image_shapes=None):
    """``model.predict`` on a padded batch, as ``(dets, labels)``.

    Args:
        model (nn.Module): The detector.
        images (Tensor): (bs, 3, h, w) normalised images.
        image_shapes (list[tuple[int, int]], optional): (h, w) of each
            image's unpadded part; the full size when None.

    Returns:
        tuple[Tensor, Tensor]: (bs, k, 5) and (bs, k), boxes in pixels of
        ``images``.
    """
    height, width = images.shape[-2:]
    if image_shapes is None:
        image_shapes = [(height, width)] * len(images)
    samples = [
        DetDataSample(
            metainfo=dict(
                img_shape=tuple(shape),
                ori_shape=tuple(shape),
                batch_input_shape=(height, width),
                scale_factor=(1.0, 1.0))) for shape in image_shapes
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


# Padded batches the ONNX models run at: (input h, input w, the (h, w) of
# each image inside). Non-square, and of other sizes than the dynamic
# trace (2 x 96 x 128): an unpadded image, a batch of two sizes, and the
# static export's 2 x 128 x 160 holding 100 x 72 and 128 x 150 images.
STATIC_SHAPE = (2, 128, 160)
RUN_BATCHES = (
    (72, 104, [(72, 104)]),
    (112, 80, [(112, 80), (90, 66)]),
    (128, 160, [(100, 72), (128, 150)]),
)


def assert_onnx_matches(model, path: str) -> None:
    """ONNX Runtime on :data:`RUN_BATCHES` gives ``model.predict``'s
    detections of the same padded batches, sorted by score.

    A model exported for a fixed size runs the batches of that size.
    """
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    detector = OnnxRuntimeDetector(path, num_threads=1)
    _, _, fixed_height, fixed_width = detector.input_shape
    runs = 0
    for seed, (height, width, image_shapes) in enumerate(RUN_BATCHES):
        if isinstance(fixed_height,
                      int) and (fixed_height, fixed_width) != (height, width):
            continue
        images = padded_images(image_shapes, height, width, seed=seed + 1)
        dets, labels = detector(images, image_shapes)
        assert dets.shape == (len(image_shapes), MAX_PER_IMG, 5)
        assert_same_detections(dets, labels,
                               *predict(model, images, image_shapes))
        # Sorted by score, as mmdet's predict.
        scores = torch.from_numpy(dets[..., 4])
        assert (scores[:, :-1] >= scores[:, 1:]).all()
        runs += 1
    assert runs > 0, f'{detector.input_shape} fits no batch of RUN_BATCHES'


def assert_dynamic_onnx_matches(model, program, path: str,
                                sampling: str) -> None:
    """Write ``program`` as ONNX with ``sampling`` and check that ONNX
    Runtime gives ``model.predict``'s detections at :data:`RUN_BATCHES`,
    with named dynamic axes."""
    from ddetr_plugin.deployment.onnx_export import (check_onnx_file,
                                                     export_onnx_program)
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    export_onnx_program(program, path, sampling=sampling)
    check_onnx_file(path)
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.metadata['sampling'] == sampling
    # The dynamic axes carry their names, in the inputs and the outputs.
    assert detector.input_shape == ('batch', 3, 'height', 'width')
    assert tuple(detector.session.get_inputs()[1].shape) == ('batch', 2)
    output_shapes = [
        tuple(output.shape) for output in detector.session.get_outputs()
    ]
    assert output_shapes == [('batch', MAX_PER_IMG, 5), ('batch', MAX_PER_IMG)]
    assert_onnx_matches(model, path)


def assert_static_onnx_matches(model, path: str) -> None:
    """Export ``model`` for the fixed :data:`STATIC_SHAPE` and check that
    ONNX Runtime gives ``predict``'s detections of smaller images padded
    to it."""
    from ddetr_plugin.deployment import example_images
    from ddetr_plugin.deployment.onnx_export import export_onnx
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    export_onnx(model, example_images(*STATIC_SHAPE[1:], STATIC_SHAPE[0]),
                path)
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.input_shape == (STATIC_SHAPE[0], 3, *STATIC_SHAPE[1:])
    assert tuple(detector.session.get_inputs()[1].shape) == (STATIC_SHAPE[0],
                                                             2)
    assert_onnx_matches(model, path)


def run_demo(arguments) -> list:
    """Run ``demo/image_demo.py`` in this process.

    Args:
        arguments (list[str]): Its command line.

    Returns:
        list[tuple[str, float, list[float]]]: The (class name, score, box)
        lines it printed, in order.
    """
    path = osp.join(REPO, 'demo', 'image_demo.py')
    spec = importlib.util.spec_from_file_location('image_demo', path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert demo.main(list(arguments)) == 0
    lines = re.findall(r'^  (.+?)\s+(\d\.\d{3})  \[(.+)\]$', output.getvalue(),
                       re.MULTILINE)
    return [(name, float(score), [float(value) for value in box.split(',')])
            for name, score, box in lines]


@pytest.fixture(scope='session')
def compiled_op() -> None:
    """Skip the test without the plugin's compiled op, which exporting
    needs; tests of messages and tools' checks run without it."""
    from ddetr_plugin.ops import extension_loaded
    if not extension_loaded():
        pytest.skip('exporting needs the compiled op')


@pytest.fixture(scope='session')
def dynamic_program(compiled_op):
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
        padded_images=padded_images,
        predict=predict,
        run_batches=RUN_BATCHES,
        assert_same_detections=assert_same_detections,
        assert_onnx_matches=assert_onnx_matches,
        assert_dynamic_onnx_matches=assert_dynamic_onnx_matches,
        assert_static_onnx_matches=assert_static_onnx_matches,
        run_demo=run_demo)
