"""Fine-tuning from an mmdet checkpoint on data with another class count.

MMDetection users fine-tune by giving mmdet's COCO checkpoint (80 classes)
as ``load_from`` to a config of their own ``num_classes``. The weights are
in mmdet's layout, converted in memory: everything but the head's
classification layers must load, those keep their initial values, and only
``load_from`` may do this (``tools/test.py`` and ``--resume`` stay strict).
"""
import logging
import os.path as osp
from types import SimpleNamespace

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner.checkpoint import load_checkpoint

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import convert_mmdet_state_dict
from ddetr_plugin.engine.checkpoint_check import (CheckpointMismatchError,
                                                  check_checkpoint_matches)
from ddetr_plugin.engine.mmdet_checkpoint_hook import MmdetCheckpointHook
from ddetr_plugin.registry import MODELS
from testkit import REPO, build_in_mmdet_scope, mmdet_mim

CONFIG = 'deformable-detr-refine_r50_16xb2-50e_coco.py'
MMDET_CONFIG = mmdet_mim('configs', 'deformable_detr', CONFIG)
PLUGIN_CONFIG = osp.join(REPO, 'configs', 'deformable_detr', CONFIG)
CLASS_KEY = 'bbox_head.cls_branches.0.weight'


def small(model_cfg, num_classes):
    """The config's model with one encoder and decoder layer."""
    model_cfg.backbone.init_cfg = None
    model_cfg.bbox_head.num_classes = num_classes
    layers = model_cfg.get('transformer', model_cfg)
    layers.encoder.num_layers = 1
    layers.decoder.num_layers = 1
    return model_cfg


@pytest.fixture(scope='module')
def coco_checkpoint(tmp_path_factory):
    """mmdet's refinement model with 80 classes, saved as mmdet saves it."""
    model = build_in_mmdet_scope(
        small(Config.fromfile(MMDET_CONFIG).model, num_classes=80))
    model.init_weights()
    path = str(tmp_path_factory.mktemp('mmdet') / 'coco.pth')
    torch.save(dict(state_dict=model.state_dict(), meta=dict(epoch=50)), path)
    return path, model.state_dict()


def plugin_model(num_classes, **changes):
    cfg = small(Config.fromfile(PLUGIN_CONFIG).model, num_classes)
    cfg.update(changes)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        return MODELS.build(cfg)


def test_load_from_takes_all_but_the_class_layers(coco_checkpoint):
    path, state = coco_checkpoint
    model = plugin_model(num_classes=3)
    initial = model.state_dict()[CLASS_KEY].clone()
    # tools/test.py and --resume: refused, naming the class layers.
    with pytest.raises(CheckpointMismatchError, match='cls_branches'):
        check_checkpoint_matches(model, path)
    # load_from: accepted, then MMEngine's loader (through the detector's
    # in-memory conversion) loads every other weight.
    check_checkpoint_matches(model, path, allow_class_change=True)
    load_checkpoint(model, path, map_location='cpu', strict=False)
    expected = convert_mmdet_state_dict(state)
    loaded = model.state_dict()
    assert torch.equal(loaded[CLASS_KEY], initial)
    others = [key for key in loaded if 'cls_branches' not in key]
    assert len(others) > 100
    for key in others:
        assert torch.equal(loaded[key], expected[key]), key


def test_class_change_does_not_excuse_other_differences(coco_checkpoint):
    path, _ = coco_checkpoint
    with pytest.raises(CheckpointMismatchError, match='query_embedding'):
        check_checkpoint_matches(
            plugin_model(num_classes=3, num_queries=100),
            path,
            allow_class_change=True)


def test_runner_hook_converts_for_load_from_but_not_for_resume(
        coco_checkpoint):
    path, _ = coco_checkpoint
    model = plugin_model(num_classes=3)
    messages = []
    logger = logging.getLogger('fine_tuning_test')
    logger.info = messages.append

    def runner(resuming):
        return SimpleNamespace(model=model, logger=logger, _resume=resuming)

    hook = MmdetCheckpointHook()
    checkpoint = torch.load(path)
    hook.after_load_checkpoint(runner(resuming=False), checkpoint)
    # Now in the plugin's layout, key for key; the class layers as saved
    # (MMEngine's loader skips them for their shape).
    assert set(checkpoint['state_dict']) == set(model.state_dict())
    assert checkpoint['state_dict'][CLASS_KEY].shape[0] == 80
    assert len(messages) == 1
    assert 'except the classification layers' in messages[0]
    with pytest.raises(CheckpointMismatchError, match='cls_branches'):
        hook.after_load_checkpoint(runner(resuming=True), torch.load(path))
