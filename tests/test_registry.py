"""The plugin's scope sits beside mmdet's without replacing anything."""

import pytest
from mmdet.registry import MODELS as MMDET_MODELS
from mmdet.registry import TASK_UTILS as MMDET_TASK_UTILS
from mmengine.config import Config
from mmengine.registry import MODELS as ROOT_MODELS
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.registry import MODELS, SCOPE, TASK_UTILS
from testkit import repo_path

# name -> (plugin registry, mmdet's registry holding the built-in class)
SHARED_NAMES = {
    'DeformableDETR': (MODELS, MMDET_MODELS),
    'DeformableDETRHead': (MODELS, MMDET_MODELS),
    'HungarianAssigner': (TASK_UTILS, MMDET_TASK_UTILS),
}


def _package(cls) -> str:
    return cls.__module__.split('.')[0]


@pytest.mark.parametrize('name', sorted(SHARED_NAMES))
def test_shared_names_resolve_per_scope(name):
    plugin_registry, mmdet_registry = SHARED_NAMES[name]
    plugin_cls = plugin_registry.get(name)
    mmdet_cls = mmdet_registry.get(name)
    assert _package(plugin_cls) == 'ddetr_plugin'
    assert _package(mmdet_cls) == 'mmdet'
    # Scope-qualified names reach the other scope's class explicitly.
    assert plugin_registry.get(f'mmdet.{name}') is mmdet_cls
    assert mmdet_registry.get(f'{SCOPE}.{name}') is plugin_cls


def test_mmcv_attention_is_not_replaced():
    # mmcv registers its attention in MMEngine's root MODELS registry.
    from mmcv.ops import MultiScaleDeformableAttention as MmcvAttention
    assert ROOT_MODELS.get('MultiScaleDeformableAttention') is MmcvAttention
    plugin_cls = MODELS.get('MultiScaleDeformableAttention')
    assert _package(plugin_cls) == 'ddetr_plugin'
    assert plugin_cls is not MmcvAttention


def test_plugin_scope_falls_back_to_mmdet_components():
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import ChannelMapper
    assert MODELS.get('ResNet') is ResNet
    assert MODELS.get('ChannelMapper') is ChannelMapper


def test_registries_are_children_of_mmdet():
    assert MODELS.parent is MMDET_MODELS
    assert TASK_UTILS.parent is MMDET_TASK_UTILS
    assert MODELS.scope == SCOPE


def test_config_with_custom_imports_builds_plugin_classes(tmp_path):
    config_file = tmp_path / 'cfg.py'
    config_file.write_text(
        "custom_imports = dict(imports=['ddetr_plugin'], "
        'allow_failed_imports=False)\n'
        "default_scope = 'ddetr_plugin'\n"
        "head = dict(type='HungarianAssigner', match_costs=[\n"
        "    dict(type='FocalLossCost', weight=2.0)])\n"
        "attention = dict(type='MultiScaleDeformableAttention', "
        'embed_dims=32, num_heads=4, num_levels=2, num_points=2)\n'
        "backbone = dict(type='ResNet', depth=18, "
        'out_indices=(3, ))\n')
    cfg = Config.fromfile(str(config_file))
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        assert DefaultScope.get_current_instance().scope_name == SCOPE
        attention = ROOT_MODELS.build(cfg.attention)
        assigner = MMDET_TASK_UTILS.build(cfg.head)
        backbone = ROOT_MODELS.build(cfg.backbone)
    assert _package(type(attention)) == 'ddetr_plugin'
    assert _package(type(assigner)) == 'ddetr_plugin'
    assert _package(type(backbone)) == 'mmdet'


TOY_CONFIG = repo_path('configs', 'toy', 'deformable-detr_toy.py')


@pytest.mark.parametrize('default_scope', ['mmdet', 'mmengine', SCOPE])
def test_plugin_config_builds_plugin_classes_in_any_scope(default_scope):
    # DetInferencer builds in 'mmdet' whatever the config says; the
    # model's _scope_ keeps every nested build in the plugin's scope.
    from mmdet.registry import MODELS as MMDET_MODELS
    cfg = Config.fromfile(TOY_CONFIG)
    cfg.model.backbone.init_cfg = None
    with DefaultScope.overwrite_default_scope(default_scope):
        model = MMDET_MODELS.build(cfg.model)
    head = model.bbox_head
    for built in (model, model.transformer.encoder.layers[0].self_attn,
                  model.transformer.decoder.layers[0].cross_attn, head,
                  head.assigner, *head.assigner.match_costs):
        assert _package(type(built)) == 'ddetr_plugin', built
    # Components the plugin does not define still come from mmdet.
    assert _package(type(model.backbone)) == 'mmdet'
    assert _package(type(head.loss_cls)) == 'mmdet'


def test_names_mmdet_lacks_resolve_in_its_scope_too():
    # DetInferencer builds the test data set in the mmdet scope.
    from mmdet.registry import DATASETS as MMDET_DATASETS
    from mmdet.registry import HOOKS as MMDET_HOOKS
    assert _package(MMDET_DATASETS.get('CheckedCocoDataset')) == \
        'ddetr_plugin'
    assert _package(MMDET_HOOKS.get('AtomicCheckpointHook')) == \
        'ddetr_plugin'
    # Names mmdet has stay mmdet's there.
    assert _package(MMDET_MODELS.get('DeformableDETR')) == 'mmdet'
    assert _package(MMDET_TASK_UTILS.get('HungarianAssigner')) == 'mmdet'
