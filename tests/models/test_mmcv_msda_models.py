"""mmdet's own models compute the same with the plugin's op under mmcv's
attention (``ddetr_plugin.mmcv_msda``).

DINO, DDQ-DETR, Mask2Former and Deformable DETR are built from mmdet
3.3.0's config files at test size (``mmcv_msda_cases.py``) and run on a
padded batch of two images with the switch off (mmcv's ``grid_sample``
path) and on: predictions, every loss term and every parameter's gradient
must agree to float32 precision, and the plugin's op must have served
every attention module. Grounding DINO is not here: its language model
needs the ``transformers`` package and a BERT tokenizer downloaded from
the Hugging Face hub, neither available offline.
"""
import os.path as osp
import runpy
from types import SimpleNamespace

import pytest
import torch

from ddetr_plugin import mmcv_patch
from ddetr_plugin.mmcv_patch import core

pytest.importorskip('scipy')

# The helper module beside this file (the tests are no package).
cases = SimpleNamespace(**runpy.run_path(
    osp.join(osp.dirname(osp.abspath(__file__)), 'mmcv_msda_cases.py')))

# Relative tolerance of float32 results: the op and grid_sample sum the
# same products in another order.
RTOL = 1e-5


@pytest.fixture(autouse=True)
def switch_off_afterwards():
    """Leave mmcv as found: other tests of this worker use its own path."""
    yield
    mmcv_patch.disable()


def _assert_close(actual, expected, what: str, rtol: float = RTOL) -> None:
    """Close to ``rtol`` of the largest magnitude of ``expected``."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual,
        expected,
        rtol=rtol,
        atol=rtol * max(scale, 1e-3),
        msg=lambda message: f'{what}: {message}')


def assert_same_run(with_plugin: dict, with_mmcv: dict) -> None:
    """Predictions, losses and gradients of two runs agree."""
    for image, (plugin_result, mmcv_result) in enumerate(
            zip(with_plugin['predictions'], with_mmcv['predictions'])):
        assert plugin_result.keys() == mmcv_result.keys()
        for key, expected in mmcv_result.items():
            _assert_close(plugin_result[key], expected,
                          f'prediction {key} of image {image}')
    assert with_plugin['losses'].keys() == with_mmcv['losses'].keys()
    for key, expected in with_mmcv['losses'].items():
        _assert_close(with_plugin['losses'][key], expected, f'loss {key}')
    assert with_plugin['gradients'].keys() == with_mmcv['gradients'].keys()
    for name, expected in with_mmcv['gradients'].items():
        _assert_close(
            with_plugin['gradients'][name],
            expected,
            f"gradient of {name}",
            rtol=1e-4)


@pytest.mark.parametrize('name', sorted(cases.CONFIGS))
def test_switched_model_computes_what_mmcv_computes(name, monkeypatch):
    model = cases.build_model(name)
    num_modules = cases.count_attention_modules(model)
    assert num_modules > 0
    counted, calls = cases.counting_calls(core, 'ms_deform_attn')
    monkeypatch.setattr(core, 'ms_deform_attn', counted)

    mmcv_patch.disable()
    with_mmcv = cases.run_model(model)
    assert calls[0] == 0
    with mmcv_patch.enabled():
        with_plugin = cases.run_model(model)
    # Every attention module once in the training pass, once in predict.
    assert calls[0] == 2 * num_modules
    assert_same_run(with_plugin, with_mmcv)
