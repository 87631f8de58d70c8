"""default_scope='ddetr_plugin' on a config inheriting mmdet's is named.

Such a config builds mmdet's Deformable DETR (its ``model`` carries mmdet's
``_scope_``); the runner building it must warn and say which line to add.
The README's two lines build the plugin's model without the warning.
"""
import collections
import os.path as osp
import warnings

import pytest
from mmdet.models.detectors import DeformableDETR as MmdetDeformableDETR
from mmengine.config import Config
from mmengine.registry import DefaultScope
from mmengine.runner import Runner

from ddetr_plugin.models.detectors import DeformableDETR
from ddetr_plugin.utils.scope_check import MmdetModelWarning

DEFAULT_SCOPE_LINE = "\ndefault_scope = 'ddetr_plugin'\n"


@pytest.fixture
def build_runner(monkeypatch, tmp_path):
    """Build a runner from a config file as tools/train.py does; the
    default scopes it creates are dropped afterwards."""
    monkeypatch.setattr(DefaultScope, '_instance_dict',
                        collections.OrderedDict(DefaultScope._instance_dict))

    def build(config: str) -> Runner:
        cfg = Config.fromfile(config)
        cfg.work_dir = str(tmp_path / 'work')
        return Runner.from_cfg(cfg)

    return build


def _config(helpers, toy_data, folder, plugin: bool, extra: str) -> str:
    path = helpers.write_mmdet_tiny_config(
        str(folder), toy_data, 'tiny.py', plugin=plugin)
    with open(path, 'a') as file:
        file.write(extra)
    return path


def test_default_scope_instead_of_scope_line_warns(helpers, toy_data, tmp_path,
                                                   build_runner):
    config = _config(helpers, toy_data, tmp_path, False, DEFAULT_SCOPE_LINE)
    with pytest.warns(MmdetModelWarning) as record:
        runner = build_runner(config)
    assert type(runner.model) is MmdetDeformableDETR
    warned = [item for item in record if item.category is MmdetModelWarning]
    assert len(warned) == 1
    message = str(warned[0].message)
    assert "mmdet's DeformableDETR" in message
    assert "model = dict(_scope_='ddetr_plugin')" in message


@pytest.mark.parametrize('plugin, extra', [(True, DEFAULT_SCOPE_LINE),
                                           (False, '')])
def test_intended_models_build_without_the_warning(helpers, toy_data, tmp_path,
                                                   build_runner, plugin,
                                                   extra):
    # The README's lines build the plugin's model; mmdet's config in its
    # own scope builds mmdet's, as asked.
    config = _config(helpers, toy_data, tmp_path, plugin, extra)
    with warnings.catch_warnings():
        warnings.simplefilter('error', MmdetModelWarning)
        runner = build_runner(config)
    expected = DeformableDETR if plugin else MmdetDeformableDETR
    assert type(runner.model) is expected
    assert osp.isdir(tmp_path / 'work')
