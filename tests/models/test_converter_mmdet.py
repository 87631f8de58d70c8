"""mmdet 3.x -> plugin weights: full-size layouts, strictness, the CLI."""
import os.path as osp
import runpy

import mmdet
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import (CheckpointMismatchError,
                                     convert_mmdet_state_dict, load_converted)
from ddetr_plugin.registry import MODELS

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MMDET_CONFIGS = osp.join(
    osp.dirname(mmdet.__file__), '.mim', 'configs', 'deformable_detr')
PLUGIN_CONFIGS = osp.join(REPO, 'configs', 'deformable_detr')
VARIANTS = [
    'deformable-detr_r50_16xb2-50e_coco.py',
    'deformable-detr-refine_r50_16xb2-50e_coco.py',
    'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py',
]
CONVERTER = osp.join(REPO, 'tools', 'model_converters', 'mmdet_to_plugin.py')


def model_cfg(directory, variant):
    cfg = Config.fromfile(osp.join(directory, variant)).model
    cfg.backbone.init_cfg = None
    return cfg


def mmdet_state_dict(variant):
    with DefaultScope.overwrite_default_scope('mmdet'):
        from mmdet.registry import MODELS as MMDET_MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        model = MMDET_MODELS.build(model_cfg(MMDET_CONFIGS, variant))
    # mmdet allocates level_embed uninitialised until init_weights: its
    # bytes may hold NaN, which no equality check accepts.
    model.init_weights()
    return model.state_dict()


def plugin_model(variant):
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        return MODELS.build(model_cfg(PLUGIN_CONFIGS, variant))


@pytest.mark.parametrize('variant', VARIANTS)
def test_full_size_weights_load_strictly(variant):
    state_dict = mmdet_state_dict(variant)
    converted = convert_mmdet_state_dict(state_dict)
    model = plugin_model(variant)
    load_converted(model, converted)
    loaded = model.state_dict()
    # Spot checks of each renaming rule.
    pairs = [('neck.convs.2.gn.weight', 'neck.projections.2.norm.weight'),
             ('neck.extra_convs.0.conv.weight',
              'neck.projections.3.conv.weight'),
             ('encoder.layers.5.ffn.layers.0.0.weight',
              'transformer.encoder.layers.5.ffn.linear1.weight'),
             ('decoder.layers.0.norms.1.bias',
              'transformer.decoder.layers.0.cross_attn_norm.bias'),
             ('decoder.layers.3.self_attn.attn.in_proj_weight',
              'transformer.decoder.layers.3.self_attn.in_proj_weight'),
             ('level_embed', 'transformer.level_embed')]
    for source, target in pairs:
        assert torch.equal(loaded[target], state_dict[source]), target
    # mmdet's neck convolutions have no bias: zeros compute the same.
    assert 'neck.convs.0.conv.bias' not in state_dict
    assert torch.all(loaded['neck.projections.0.conv.bias'] == 0)


def test_mismatches_are_named():
    model = plugin_model(VARIANTS[0])
    converted = convert_mmdet_state_dict(mmdet_state_dict(VARIANTS[0]))
    del converted['transformer.level_embed']
    converted['transformer.unknown.weight'] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as error:
        load_converted(model, converted)
    message = str(error.value)
    assert 'missing keys' in message and 'transformer.level_embed' in message
    assert 'unexpected keys' in message
    assert 'transformer.unknown.weight' in message


def test_variant_mismatch_is_refused():
    # Weights of plain Deformable DETR lack the two-stage layers.
    model = plugin_model(VARIANTS[2])
    with pytest.raises(CheckpointMismatchError, match='memory_trans_fc'):
        load_converted(model,
                       convert_mmdet_state_dict(mmdet_state_dict(VARIANTS[0])))


def test_command_line(tmp_path, monkeypatch):
    source = tmp_path / 'mmdet.pth'
    target = tmp_path / 'plugin.pth'
    torch.save(
        dict(state_dict=mmdet_state_dict(VARIANTS[1]), meta=dict(epoch=50)),
        source)
    monkeypatch.setattr('sys.argv', [
        CONVERTER,
        str(source),
        str(target), '--config',
        osp.join(PLUGIN_CONFIGS, VARIANTS[1])
    ])
    runpy.run_path(CONVERTER, run_name='__main__')
    written = torch.load(target, weights_only=True)
    assert set(written) == {'state_dict', 'meta'}
    load_converted(plugin_model(VARIANTS[1]), written['state_dict'])


def test_command_line_rejects_a_file_without_weights(tmp_path):
    namespace = runpy.run_path(CONVERTER)
    source = tmp_path / 'bad.pth'
    torch.save(dict(something=[1, 2]), source)
    with pytest.raises(ValueError, match='not an MMDetection checkpoint'):
        namespace['main']([str(source), str(tmp_path / 'out.pth')])
