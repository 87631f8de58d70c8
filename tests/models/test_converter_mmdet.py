"""mmdet 3.x -> plugin weights: full-size layouts, strictness, the CLI."""
import os.path as osp
import runpy

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import (CheckpointMismatchError,
                                     convert_mmdet_state_dict, load_converted)
from ddetr_plugin.converters.in_memory import (rename_for_model,
                                               reorder_optimizer_state)
from ddetr_plugin.registry import MODELS
from testkit import PLUGIN_LINES, REPO, build_in_mmdet_scope, mmdet_mim

MMDET_CONFIGS = mmdet_mim('configs', 'deformable_detr')
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
    model = build_in_mmdet_scope(model_cfg(MMDET_CONFIGS, variant))
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


# In-memory conversion: mmdet weights (and optimizer state) loaded as saved.


def test_mmdet_weights_load_directly_with_one_log_line(tmp_path, monkeypatch):
    from mmengine.runner import load_checkpoint

    from ddetr_plugin.models.detectors import detr_base
    logged = []
    monkeypatch.setattr(detr_base, 'print_log',
                        lambda message, **kwargs: logged.append(message))
    state_dict = mmdet_state_dict(VARIANTS[2])
    path = tmp_path / 'mmdet.pth'
    torch.save(dict(state_dict=state_dict, meta=dict(epoch=50)), path)
    model = plugin_model(VARIANTS[2])
    # MMEngine's loader (load_from, test tools, init_detector) is not
    # strict; the conversion is.
    load_checkpoint(model, str(path), map_location='cpu', strict=False)
    expected = convert_mmdet_state_dict(state_dict)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert len(logged) == 1 and 'converted in memory' in logged[0]
    # The plugin's own layout loads without a word.
    model.load_state_dict(model.state_dict())
    assert len(logged) == 1


def test_mmdet_weights_of_another_variant_are_refused():
    # Two-stage weights into the plain model, even through a non-strict
    # load.
    model = plugin_model(VARIANTS[0])
    with pytest.raises(CheckpointMismatchError) as error:
        model.load_state_dict(mmdet_state_dict(VARIANTS[2]), strict=False)
    message = str(error.value)
    assert 'layout of MMDetection 3.x' in message
    assert 'transformer.memory_trans_fc.weight' in message


def test_official_weights_name_their_converter():
    model = plugin_model(VARIANTS[0])
    official = {'input_proj.0.0.weight': torch.zeros(1)}
    with pytest.raises(
            CheckpointMismatchError, match='official_to_plugin.py IN.pth'):
        model.load_state_dict(official, strict=False)


def _small(model_cfg):
    model_cfg.backbone.update(depth=18, init_cfg=None)
    model_cfg.neck.in_channels = [128, 256, 512]
    model_cfg.encoder.num_layers = model_cfg.decoder.num_layers = 1
    return model_cfg


def test_optimizer_state_follows_the_parameters(tmp_path):
    from mmengine.optim import build_optim_wrapper

    variant = VARIANTS[2]
    mmdet_cfg = Config.fromfile(osp.join(MMDET_CONFIGS, variant))
    path = tmp_path / 'inheriting.py'
    path.write_text(
        PLUGIN_LINES.format(base=f'mmdet::deformable_detr/{variant}'))
    plugin_cfg = Config.fromfile(str(path))
    with DefaultScope.overwrite_default_scope('mmdet'):
        from mmdet.registry import MODELS as MMDET_MODELS
        reference = MMDET_MODELS.build(_small(mmdet_cfg.model))
        plugin = MMDET_MODELS.build(_small(plugin_cfg.model))
        # mmdet's recipe: one group per parameter (paramwise_cfg).
        reference_optim = build_optim_wrapper(reference,
                                              mmdet_cfg.optim_wrapper)
        plugin_optim = build_optim_wrapper(plugin, plugin_cfg.optim_wrapper)
    generator = torch.Generator().manual_seed(0)
    for parameter in reference.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    reference_optim.optimizer.step()
    state_keys = list(reference.state_dict())
    plugin.load_state_dict(reference.state_dict())
    plugin_optim.load_state_dict(
        reorder_optimizer_state(reference_optim.state_dict(), state_keys,
                                plugin, plugin_optim.optimizer))
    names = rename_for_model(state_keys, plugin.state_dict())
    plugin_parameters = dict(plugin.named_parameters())
    compared = 0
    for name, parameter in reference.named_parameters():
        if not parameter.requires_grad:  # frozen: not optimized
            continue
        mine = plugin_parameters[names[name]]
        saved = reference_optim.optimizer.state[parameter]
        loaded = plugin_optim.optimizer.state[mine]
        assert torch.equal(loaded['exp_avg'], saved['exp_avg']), name
        compared += 1
    optimized = [
        name for name, parameter in plugin_parameters.items()
        if parameter.requires_grad
    ]
    assert compared == len(optimized) > 50
    # The group settings (lr_mult of sampling offsets) moved with them.
    for group in plugin_optim.optimizer.param_groups:
        (parameter, ) = group['params']
        name = next((key for key, value in plugin_parameters.items()
                     if value is parameter), 'outside the model')
        slow = any(
            key in name
            for key in ('backbone', 'sampling_offsets', 'reference_points'))
        assert group['lr'] == pytest.approx(2e-5 if slow else 2e-4), name
