"""The backbone's folded CPU inference path: the same maps as the backbone
run as built, fresh weights at every call, and the backbone as built
wherever folding could change behaviour."""
import copy
import os.path as osp

import pytest
import torch
from mmdet.models.backbones import ResNet
from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import nn

import ddetr_plugin  # noqa: F401
from ddetr_plugin.models.detectors.backbone_folding import (BackboneInference,
                                                            FoldedConvNorm,
                                                            fold_backbone)
from ddetr_plugin.registry import MODELS
from testkit import REPO


def _randomise_norms(backbone: nn.Module, seed: int = 0) -> None:
    # Fresh norms fold to the identity; random statistics make a wrong
    # fold visible.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(
                    torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(
                    torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(
                    torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)


def _resnet(depth: int = 18, **kwargs) -> ResNet:
    backbone = ResNet(depth=depth, base_channels=8, **kwargs)
    _randomise_norms(backbone)
    backbone.eval()
    return backbone


def _images(dtype=torch.float32) -> torch.Tensor:
    # Not square, and not a multiple of 32.
    return torch.randn(
        2, 3, 72, 120, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _assert_same_maps(outputs, expected, tolerance=1e-5):
    assert len(outputs) == len(expected)
    for output, reference in zip(outputs, expected):
        assert output.shape == reference.shape
        assert output.is_contiguous()
        torch.testing.assert_close(
            output, reference, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    'depth, kwargs, pairs',
    [
        (18, dict(), 20),
        (50, dict(), 53),
        # DC5: the dilated last stage of Conditional DETR's DC5 configs.
        (50, dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)), 53),
        # ResNetV1d-style deep stem and average-pool shortcut.
        (50, dict(deep_stem=True, avg_down=True), 55),
    ])
def test_folded_maps_match_the_backbone(depth, kwargs, pairs):
    backbone = _resnet(depth, out_indices=(0, 1, 2, 3), **kwargs)
    graph, folded = fold_backbone(backbone)
    norms = sum(
        isinstance(module, nn.BatchNorm2d) for module in backbone.modules())
    assert folded == norms == pairs
    images = _images()
    with torch.no_grad():
        expected = backbone(images)
        outputs = BackboneInference()(backbone, images)
        traced = graph(images.contiguous(memory_format=torch.channels_last))
    _assert_same_maps(outputs, expected)
    _assert_same_maps([map.contiguous() for map in traced], expected)


def test_float64_is_exact_to_rounding():
    backbone = _resnet(50).double()
    images = _images(torch.float64)
    with torch.no_grad():
        _assert_same_maps(BackboneInference()(backbone, images),
                          backbone(images), 1e-12)


def test_weights_written_through_data_are_seen():
    backbone = _resnet()
    inference = BackboneInference()
    images = _images()
    with torch.no_grad():
        before = inference(backbone, images)
    # .data bypasses the version counters (MMEngine's EMAHook swaps
    # weights this way): a cache of folded weights would miss it.
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data.mul_(1.5)
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.data.mul_(3.0)
            module.bias.data.add_(0.25)
    with torch.no_grad():
        expected = backbone(images)
        after = inference(backbone, images)
    assert not torch.allclose(before[-1], expected[-1], atol=1e-3)
    _assert_same_maps(after, expected)


def test_replacing_a_module_retraces():
    backbone = _resnet()
    inference = BackboneInference()
    images = _images()
    with torch.no_grad():
        inference(backbone, images)
        old_graph = inference.graph_of(backbone)
        block = backbone.layer4[0]
        block.conv1 = nn.Conv2d(
            block.conv1.in_channels,
            block.conv1.out_channels,
            3,
            stride=block.conv1.stride,
            padding=1,
            bias=False)
        expected = backbone(images)
        outputs = inference(backbone, images)
    assert inference.graph_of(backbone) is not old_graph
    _assert_same_maps(outputs, expected)


def test_gradients_in_eval_mode_match():
    # float64: in float32 the sums of the weight gradients cancel enough
    # for rounding to reach 4e-3 of a few small elements.
    backbone = _resnet().double()
    images = _images(torch.float64)
    gradients = []
    for inference in (BackboneInference(False), BackboneInference()):
        inference(backbone, images)  # the first folded call compares
        backbone.zero_grad()
        sum(map_.square().sum()
            for map_ in inference(backbone, images)).backward()
        gradients.append(
            [parameter.grad.clone() for parameter in backbone.parameters()])
    for plain, folded in zip(*gradients):
        torch.testing.assert_close(folded, plain, rtol=1e-9, atol=1e-9)


def _runs_folded(backbone, images, inference=None) -> bool:
    """Whether the folded graph ran: it calls the convolutions through
    FoldedConvNorm, so a hook on the first block's norm stays silent."""
    inference = inference or BackboneInference()
    calls = []
    original = FoldedConvNorm.forward

    def counting(self, inputs):
        calls.append(1)
        return original(self, inputs)

    FoldedConvNorm.forward = counting
    try:
        with torch.no_grad():
            outputs = inference(backbone, images)
            expected = backbone(images)
    finally:
        FoldedConvNorm.forward = original
    _assert_same_maps(outputs, expected)
    return bool(calls)


def test_folds_in_eval_mode_on_the_cpu():
    # The control of the cases below: the same backbone does fold.
    assert _runs_folded(_resnet(), _images())


def test_training_mode_runs_as_built():
    backbone = _resnet()
    backbone.norm_eval = True  # mmdet's norms in eval, the blocks not
    backbone.train()
    assert not any(module.training for module in backbone.modules()
                   if isinstance(module, nn.BatchNorm2d))
    assert not _runs_folded(backbone, _images())


def test_hooks_run_as_built():
    backbone = _resnet()
    seen = []
    backbone.layer2.register_forward_hook(
        lambda module, inputs, output: seen.append(output.shape))
    assert not _runs_folded(backbone, _images())
    assert seen, 'the hook on layer2 did not run'


def test_disabled_and_half_precision_run_as_built():
    assert not _runs_folded(_resnet(), _images(), BackboneInference(False))
    backbone = _resnet().to(torch.bfloat16)
    assert not _runs_folded(backbone, _images(torch.bfloat16))


class _Detector(nn.Module):
    """The backbone stage of a detector, as an exporter sees it."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.inference = BackboneInference()

    def forward(self, images):
        return self.inference(self.backbone, images)


def test_tracing_records_the_backbone_as_built():
    detector = _Detector(_resnet())
    traced = torch.jit.trace(detector, _images())
    assert 'batch_norm' in str(traced.inlined_graph)
    # Not for want of a graph: it would fold outside tracing.
    assert detector.inference.graph_of(detector.backbone) is not None


class _DataDependent(nn.Module):
    """A backbone with control flow on its input, which fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4).eval()

    def forward(self, images):
        if images.sum() > 0:
            return (self.norm(self.conv(images)), )
        return (self.norm(self.conv(-images)), )


def test_untraceable_backbone_runs_as_built():
    backbone = _DataDependent().eval()
    _randomise_norms(backbone)
    inference = BackboneInference()
    images = _images()
    with torch.no_grad():
        outputs = inference(backbone, images)
        _assert_same_maps(outputs, backbone(images))
    assert inference.graph_of(backbone) is None


class _Misbehaving(nn.Module):
    """Traces, but the trace bakes in a value read from a global at
    trace time, so the graph is not the module's function afterwards."""

    scale = 1.0

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4).eval()

    def forward(self, images):
        return (self.norm(self.conv(images)) * _Misbehaving.scale, )


def test_a_graph_that_differs_is_dropped():
    backbone = _Misbehaving().eval()
    inference = BackboneInference()
    images = _images()
    inference.graph_of(backbone)
    _Misbehaving.scale = 2.0
    try:
        with torch.no_grad():
            outputs = inference(backbone, images)
            _assert_same_maps(outputs, backbone(images))
            assert not _runs_folded(backbone, images, inference)
    finally:
        _Misbehaving.scale = 1.0


def _toy_detector(**overrides):
    cfg = Config.fromfile(
        osp.join(REPO, 'configs', 'toy', 'conditional-detr_toy.py')).model
    cfg.update(overrides)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        detector = MODELS.build(cfg)
    _randomise_norms(detector.backbone)
    detector.eval()
    return detector


def test_detector_predicts_the_same_and_keeps_its_state():
    from mmdet.structures import DetDataSample
    detector = _toy_detector()
    keys = list(detector.state_dict())
    images = torch.randn(1, 3, 96, 128)
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(96, 128),
            ori_shape=(96, 128),
            batch_input_shape=(96, 128),
            scale_factor=(1.0, 1.0)))
    with torch.no_grad():
        detector.predict(images, [sample.clone()])
        # predict went through the folded graph.
        assert detector.backbone_inference.graph_of(
            detector.backbone) is not None
        copied = copy.deepcopy(detector)
        # The raw outputs, not the top-k detections: the untrained model's
        # scores nearly tie, so rounding may reorder its detections.
        folded = detector._forward(images, [sample.clone()])
        again = copied._forward(images, [sample.clone()])
        detector.backbone_inference.enabled = False
        plain = detector._forward(images, [sample.clone()])
    assert list(detector.state_dict()) == keys
    for outputs in (folded, again):
        # Every decoder layer's class logits and normalised boxes.
        for output, expected in zip(outputs, plain):
            torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    # The copy traced its own modules, not the original's.
    copied_graph = copied.backbone_inference.graph_of(copied.backbone)
    assert copied.backbone.layer1[0].conv1 in list(copied_graph.modules())


def test_the_flag_must_be_a_bool():
    with pytest.raises(TypeError, match='model.fast_backbone_inference'):
        _toy_detector(fast_backbone_inference='no')


def test_the_first_call_returns_the_folded_maps_too():
    # The first call compares with the backbone as built; returning those
    # maps would make it differ from every later call by rounding.
    backbone = _resnet(50)
    inference = BackboneInference()
    images = _images()
    with torch.no_grad():
        first = inference(backbone, images)
        second = inference(backbone, images)
    for one, other in zip(first, second):
        assert torch.equal(one, other)
