"""Another mmdet backbone, through the config only: Swin-T instead of R50."""
import os.path as osp

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.structures import InstanceData

import ddetr_plugin  # noqa: F401
from ddetr_plugin.registry import MODELS

pytest.importorskip('scipy')

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs', 'deformable_detr',
                  'deformable-detr-refine_r50_16xb2-50e_coco.py')


def swin_model():
    model = Config.fromfile(CONFIG).model
    # Swin-T's widths, with one block per stage to stay small.
    model.backbone = dict(
        type='SwinTransformer',
        embed_dims=96,
        depths=[1, 1, 1, 1],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        out_indices=(1, 2, 3),
        drop_path_rate=0.0,
        init_cfg=None)
    model.neck.in_channels = [192, 384, 768]
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


def test_swin_backbone_loss_and_predict():
    model = swin_model()
    assert type(model.backbone).__name__ == 'SwinTransformer'
    model.train()
    losses = model(**data(model, training=True), mode='loss')
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.patch_embed.projection.weight.grad is not None
    model.eval()
    with torch.no_grad():
        results = model(**data(model, training=False), mode='predict')
    assert len(results[0].pred_instances) == 100
    assert torch.isfinite(results[0].pred_instances.bboxes).all()
