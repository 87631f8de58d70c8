"""The switch that puts the plugin's op under mmcv's attention.

``ddetr_plugin.mmcv_msda`` (the config line) and ``ddetr_plugin.mmcv_patch``
(enable, disable, the context manager, the checks of mmcv's module).
"""
import json
import subprocess
import sys
import warnings

import mmcv
import pytest
import torch
from mmcv.ops import MultiScaleDeformableAttention
from mmcv.ops import multi_scale_deform_attn as mmcv_module

from ddetr_plugin import mmcv_patch
from ddetr_plugin.mmcv_patch import core, switch
from testkit import REPO

MMCV_NAMES = ('multi_scale_deformable_attn_pytorch',
              'MultiScaleDeformableAttnFunction')
MMCV_OBJECTS = tuple(getattr(mmcv_module, name) for name in MMCV_NAMES)
STAND_INS = (core.plugin_sampling_without_start_index,
             core.PluginSamplingFunction)


def mmcv_names_now() -> tuple:
    return tuple(getattr(mmcv_module, name) for name in MMCV_NAMES)


@pytest.fixture(autouse=True)
def switch_off_afterwards():
    """Leave mmcv as found: other tests of this worker use its own path."""
    mmcv_patch.disable()
    yield
    mmcv_patch.disable()


@pytest.fixture
def log_lines(monkeypatch):
    """The messages the switch logs."""
    lines = []
    monkeypatch.setattr(switch, 'print_log',
                        lambda message, **kwargs: lines.append(message))
    return lines


def test_enable_and_disable_swap_mmcv_sampling_functions(log_lines):
    assert mmcv_names_now() == MMCV_OBJECTS and not mmcv_patch.is_enabled()
    mmcv_patch.enable()
    assert mmcv_names_now() == STAND_INS and mmcv_patch.is_enabled()
    # A second enable changes nothing and logs nothing; disable then still
    # gives back mmcv's own functions, not the stand-ins.
    mmcv_patch.enable()
    assert len(log_lines) == 1
    assert 'now samples with ddetr_plugin\'s op' in log_lines[0]
    mmcv_patch.disable()
    assert mmcv_names_now() == MMCV_OBJECTS and not mmcv_patch.is_enabled()


def test_warns_when_cuda_tensors_would_lose_a_cuda_kernel(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(switch, 'kernel_device_types',
                        lambda: frozenset({'cpu', 'meta'}))
    with pytest.warns(UserWarning, match='no CUDA kernels'):
        mmcv_patch.enable()
    mmcv_patch.disable()
    monkeypatch.setattr(switch, 'kernel_device_types',
                        lambda: frozenset({'cpu', 'cuda', 'meta'}))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        mmcv_patch.enable()


def test_context_manager_restores_the_state_it_found():
    with mmcv_patch.enabled():
        assert mmcv_names_now() == STAND_INS
    assert mmcv_names_now() == MMCV_OBJECTS
    mmcv_patch.enable()
    with mmcv_patch.enabled():
        pass
    assert mmcv_names_now() == STAND_INS
    with pytest.raises(KeyError):
        mmcv_patch.disable()
        with mmcv_patch.enabled():
            raise KeyError('inside the block')
    assert mmcv_names_now() == MMCV_OBJECTS


def _other_signature(value, spatial_shapes, level_start_index,
                     sampling_locations, attention_weights):
    raise AssertionError('never called')


def _forward_without_the_names(self, query, **kwargs):
    return query


@pytest.mark.parametrize(
    'change, expected', [
        (lambda patch: patch.setattr(mmcv_module, MMCV_NAMES[0],
                                     _other_signature), 'takes'),
        (lambda patch: patch.delattr(mmcv_module, MMCV_NAMES[1]), 'has no'),
        (lambda patch: patch.setattr(MultiScaleDeformableAttention, 'forward',
                                     _forward_without_the_names),
         'not defined in'),
    ],
    ids=['signature', 'missing', 'forward'])
def test_refuses_an_mmcv_it_was_not_written_for(change, expected, monkeypatch):
    change(monkeypatch)
    found = mmcv_names_now() if hasattr(mmcv_module, MMCV_NAMES[1]) else None
    with pytest.raises(RuntimeError) as error:
        mmcv_patch.enable()
    message = str(error.value)
    assert f'mmcv {mmcv.__version__}' in message
    assert expected in message
    assert not mmcv_patch.is_enabled()
    if found is not None:
        assert mmcv_names_now() == found


def test_mmcv_as_installed_fits():
    assert mmcv_patch.mmcv_mismatches() == []
    # Also while switched on: mmcv's own functions are the ones checked.
    with mmcv_patch.enabled():
        assert mmcv_patch.mmcv_mismatches() == []


def _attention_inputs(reference_dims: int, dtype=torch.float32):
    """A small batch-first attention call with padding, (x, y) or boxes."""
    generator = torch.Generator().manual_seed(reference_dims)
    shapes = torch.tensor([[6, 8], [3, 4], [2, 2]])
    num_keys = int((shapes[:, 0] * shapes[:, 1]).sum())
    batch_size, num_queries = 2, 7
    query = torch.randn(batch_size, num_queries, 32, generator=generator)
    value = torch.randn(batch_size, num_keys, 32, generator=generator)
    padding = torch.zeros(batch_size, num_keys, dtype=torch.bool)
    padding[1, -5:] = True
    reference = torch.rand(
        batch_size, num_queries, 3, reference_dims, generator=generator)
    sizes = shapes[:, 0] * shapes[:, 1]
    return dict(
        query=query.to(dtype).requires_grad_(),
        value=value.to(dtype).requires_grad_(),
        key_padding_mask=padding,
        reference_points=reference.to(dtype),
        spatial_shapes=shapes,
        level_start_index=sizes.cumsum(0) - sizes)


def _attention_module():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(
        embed_dims=32,
        num_heads=4,
        num_levels=3,
        num_points=2,
        dropout=0.0,
        batch_first=True)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return module


@pytest.mark.parametrize('reference_dims', [2, 4])
def test_mmcv_module_output_and_gradients_unchanged(reference_dims):
    module = _attention_module()
    results = []
    for switched in (False, True):
        inputs = _attention_inputs(reference_dims)
        module.zero_grad()
        if switched:
            with mmcv_patch.enabled():
                output = module(**inputs)
        else:
            output = module(**inputs)
        output.square().sum().backward()
        results.append([
            output.detach(), inputs['query'].grad, inputs['value'].grad,
            module.sampling_offsets.weight.grad,
            module.attention_weights.weight.grad
        ])
    for plugin, mmcv_result in zip(results[1], results[0]):
        torch.testing.assert_close(plugin, mmcv_result, rtol=1e-5, atol=1e-5)


def test_cuda_stand_in_on_cpu_tensors_matches_mmcv():
    """The CUDA path's stand-in, fed on the CPU: im2col_step is ignored,
    the level offsets are the given ones."""
    inputs = _attention_inputs(2)
    value = inputs['value'].detach().view(2, -1, 4, 8)
    locations = torch.rand(2, 7, 4, 3, 2, 2)
    weights = torch.rand(2, 7, 4, 3, 2)
    expected = MMCV_OBJECTS[0](value, inputs['spatial_shapes'], locations,
                               weights)
    output = core.PluginSamplingFunction.apply(value, inputs['spatial_shapes'],
                                               inputs['level_start_index'],
                                               locations, weights, 1)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    # Half locations beside a float32 value are computed in float32, as
    # mmcv casts them to the value's dtype.
    output = core.PluginSamplingFunction.apply(value, inputs['spatial_shapes'],
                                               inputs['level_start_index'],
                                               locations.half(),
                                               weights.half(), 64)
    expected = MMCV_OBJECTS[0](value, inputs['spatial_shapes'],
                               locations.half().float(),
                               weights.half().float())
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_module_output_unchanged():
    module = _attention_module().cuda()
    outputs = []
    for switched in (False, True):
        inputs = {
            key: value.detach().cuda()
            for key, value in _attention_inputs(2).items()
        }
        with torch.no_grad():
            if switched:
                with mmcv_patch.enabled():
                    outputs.append(module(**inputs))
            else:
                outputs.append(module(**inputs))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


# Run in a fresh interpreter: whether a module was imported before is
# state of the whole process.
CONFIG_LINE_SCRIPT = r'''
import json, sys
import mmcv.ops.multi_scale_deform_attn as mmcv_module
names = ('multi_scale_deformable_attn_pytorch',
         'MultiScaleDeformableAttnFunction')
def current():
    return [getattr(mmcv_module, name).__module__ for name in names]
facts = {'before': current()}
import ddetr_plugin
facts['after_import'] = current()
facts['switch_imported'] = 'ddetr_plugin.mmcv_msda' in sys.modules
from mmengine.config import Config
Config.fromfile(sys.argv[1])
facts['after_config'] = current()
import ddetr_plugin.mmcv_msda
ddetr_plugin.mmcv_msda.disable()
facts['after_disable'] = current()
print('FACTS ' + json.dumps(facts))
'''


def test_config_line_switches_and_package_import_does_not(tmp_path):
    config = tmp_path / 'dino_with_plugin_op.py'
    config.write_text(
        "_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'\n"
        "custom_imports = dict(imports=['ddetr_plugin.mmcv_msda'], "
        'allow_failed_imports=False)\n')
    result = subprocess.run(
        [sys.executable, '-c', CONFIG_LINE_SCRIPT,
         str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    facts = json.loads(output.split('FACTS ', 1)[1].splitlines()[0])
    mmcv_owner = 'mmcv.ops.multi_scale_deform_attn'
    plugin_owner = 'ddetr_plugin.mmcv_patch.core'
    assert facts['before'] == [mmcv_owner] * 2
    assert facts['after_import'] == [mmcv_owner] * 2
    assert not facts['switch_imported']
    assert facts['after_config'] == [plugin_owner] * 2
    assert facts['after_disable'] == [mmcv_owner] * 2
    assert output.count('now samples with ddetr_plugin\'s op') == 1
