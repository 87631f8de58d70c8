"""Other mmdet backbones through the config only: the backbone configs of
configs/deformable_detr/ build, train a step and predict.

Each config is checked as written (backbone type, depth, DCN stages, neck
channels), then shrunk where it costs seconds on a CPU: the transformer to
one layer of each kind, and the deepest backbones to fewer blocks of the
same kind. Pretrained weights are not loaded (init_cfg=None).
"""
import os.path as osp

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin  # noqa: F401
from ddetr_plugin.registry import MODELS
from testkit import REPO

pytest.importorskip('scipy')

CONFIG_DIR = osp.join(REPO, 'configs', 'deformable_detr')
R50_CHANNELS = [512, 1024, 2048]


def _shrink_resnet(model):
    # R50's block counts instead of 101's and a quarter of the width: the
    # same kind of blocks (and DCN layers) in the same stages.
    model.backbone.depth = 50
    model.backbone.base_channels = 16
    model.neck.in_channels = [channels // 4 for channels in R50_CHANNELS]


def _shrink_swin(model):
    model.backbone.depths = [1, 1, 1, 1]


# config file: (what it must say, how the test shrinks it)
BACKBONES = {
    'deformable-detr_swin-t-p4-w7_16xb2-50e_coco.py': (dict(
        type='SwinTransformer',
        embed_dims=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_indices=(1, 2, 3),
        neck_in_channels=[192, 384, 768]), _shrink_swin),
    'deformable-detr_r101_16xb2-50e_coco.py':
    (dict(type='ResNet', depth=101,
          neck_in_channels=R50_CHANNELS), _shrink_resnet),
    'deformable-detr_x101-64x4d_16xb2-50e_coco.py': (dict(
        type='ResNeXt',
        depth=101,
        groups=64,
        base_width=4,
        neck_in_channels=R50_CHANNELS), _shrink_resnet),
    'deformable-detr_r50-mdconv-c3-c5_16xb2-50e_coco.py': (dict(
        type='ResNet',
        depth=50,
        stage_with_dcn=(False, True, True, True),
        neck_in_channels=R50_CHANNELS), _shrink_resnet),
}


@pytest.fixture(autouse=True)
def one_thread():
    """At this size a step is a few milliseconds of work per layer: more
    threads only wait for each other (seconds on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(config_name):
    cfg = Config.fromfile(osp.join(CONFIG_DIR, config_name))
    expected, shrink = BACKBONES[config_name]
    expected = dict(expected)
    assert list(cfg.model.neck.in_channels) == expected.pop('neck_in_channels')
    for key, value in expected.items():
        got = cfg.model.backbone[key]
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(value) if isinstance(value, tuple) else value), key
    if cfg.model.backbone.type == 'SwinTransformer':
        # Nothing of R50 left over (_delete_=True): Swin takes no depth.
        assert 'depth' not in cfg.model.backbone
    model = cfg.model
    model.backbone.init_cfg = None
    shrink(model)
    model.num_queries = 10
    model.transformer.encoder.num_layers = 1
    model.transformer.decoder.num_layers = 1
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        return MODELS.build(model)


def data(model, training):
    sample = DetDataSample(
        metainfo=dict(
            img_shape=(64, 96), ori_shape=(64, 96), scale_factor=(1., 1.)))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[8., 8., 50., 40.]]), labels=torch.tensor([1]))
    return model.data_preprocessor(
        dict(
            inputs=[torch.randint(0, 256, (3, 64, 96)).byte()],
            data_samples=[sample]), training)


@pytest.mark.parametrize('config_name', sorted(BACKBONES))
def test_backbone_config_trains_a_step_and_predicts(config_name):
    model = build(config_name)
    model.train()
    losses = model(**data(model, training=True), mode='loss')
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    # The gradient reaches the backbone's last stage.
    last_stage = [
        parameter for name, parameter in model.backbone.named_parameters()
        if name.startswith(('layer4.', 'stages.3.'))
    ]
    assert last_stage and any(
        parameter.grad is not None and parameter.grad.abs().sum() > 0
        for parameter in last_stage)
    model.eval()
    with torch.no_grad():
        results = model(**data(model, training=False), mode='predict')
    assert len(results[0].pred_instances) == 100
    assert torch.isfinite(results[0].pred_instances.bboxes).all()


def test_dcn_config_puts_modulated_deformable_convolutions_in_stages_2_to_4():
    from mmcv.ops import ModulatedDeformConv2dPack
    model = build('deformable-detr_r50-mdconv-c3-c5_16xb2-50e_coco.py')
    for stage, expected in (('layer1', False), ('layer2', True),
                            ('layer3', True), ('layer4', True)):
        blocks = getattr(model.backbone, stage)
        assert all(
            isinstance(block.conv2, ModulatedDeformConv2dPack) == expected
            for block in blocks), stage
