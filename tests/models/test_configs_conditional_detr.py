"""The Conditional DETR configs: mmdet's recipe, and each builds its model."""
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from testkit import REPO

FOLDER = osp.join(REPO, 'configs', 'conditional_detr')
# config -> (backbone depth, stride of the map the encoder reads)
CONFIGS = {
    'conditional-detr_r50_8xb2-50e_coco.py': (50, 32),
    'conditional-detr_r101_8xb2-50e_coco.py': (101, 32),
    'conditional-detr_r50-dc5_8xb2-50e_coco.py': (50, 16),
    'conditional-detr_r101-dc5_8xb2-50e_coco.py': (101, 16),
}


@pytest.mark.parametrize('name', list(CONFIGS))
def test_config_has_mmdets_recipe_and_builds(name):
    cfg = Config.fromfile(osp.join(FOLDER, name))
    assert cfg.model.num_queries == 300
    assert cfg.model.bbox_head.num_classes == 80
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr) == ('AdamW', 1e-4)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys.backbone.lr_mult == 0.1
    assert cfg.optim_wrapper.clip_grad.max_norm == 0.1
    assert cfg.train_cfg.max_epochs == 50
    assert cfg.param_scheduler[0].milestones == [40]
    depth, stride = CONFIGS[name]
    # ImageNet weights of the backbone's own depth.
    assert cfg.model.backbone.init_cfg.checkpoint == (
        f'torchvision://resnet{depth}')
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        from ddetr_plugin.registry import MODELS
        model = MODELS.build(cfg.model).eval()
    assert type(model).__name__ == 'ConditionalDETR'
    assert model.backbone.depth == depth
    with torch.no_grad():
        features = model.extract_feat(torch.zeros(1, 3, 64, 96))
    assert len(features) == 1
    assert features[0].shape == (1, 256, 64 // stride, 96 // stride)
