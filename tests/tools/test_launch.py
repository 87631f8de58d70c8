"""Config preparation shared by the tools: scope, overrides, CPU launch."""
import os.path as osp

import pytest
import torch
import torch.distributed as torch_dist
from mmengine.config import Config

from ddetr_plugin.engine.launch import (load_config, prepare_distributed,
                                        use_plugin_scope)


def _config_file(tmp_path, text):
    path = tmp_path / 'config.py'
    path.write_text(text)
    return str(path)


def test_plain_mmdet_config_is_moved_to_the_plugin_scope(tmp_path):
    path = _config_file(
        tmp_path, "default_scope = 'mmdet'\n"
        "custom_imports = dict(imports=['numpy'])\n"
        "model = dict(type='ResNet', depth=18)\n")
    cfg = load_config(path)
    assert cfg.default_scope == 'ddetr_plugin'
    assert cfg.custom_imports.imports == [
        'numpy', 'ddetr_plugin', 'ddetr_plugin.engine'
    ]
    assert cfg.custom_imports.allow_failed_imports is False


def test_overrides_apply_in_mmdetection_order(tmp_path):
    path = _config_file(tmp_path, "model = dict(depth=18)\n")
    cfg = load_config(path, cfg_options={'model.depth': 34})
    assert cfg.model.depth == 34
    assert cfg.work_dir == osp.join('./work_dirs', 'config')
    cfg = load_config(path, work_dir=str(tmp_path / 'out'), launcher='slurm')
    assert cfg.work_dir == str(tmp_path / 'out')
    assert cfg.launcher == 'slurm'


def test_missing_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.py'):
        load_config(str(tmp_path / 'nothing.py'))


def test_use_plugin_scope_keeps_a_plugin_config_as_it_is():
    cfg = Config(
        dict(
            default_scope='ddetr_plugin',
            custom_imports=dict(
                imports=['ddetr_plugin', 'ddetr_plugin.engine'])))
    use_plugin_scope(cfg)
    assert cfg.custom_imports.imports == [
        'ddetr_plugin', 'ddetr_plugin.engine'
    ]


def test_unknown_launcher_is_refused():
    with pytest.raises(ValueError, match="got 'mpi'"):
        prepare_distributed(Config(dict(launcher='mpi')))


def test_single_process_launch_is_left_to_mmengine():
    cfg = Config(
        dict(launcher='none', env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    prepare_distributed(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'
    assert 'model_wrapper_cfg' not in cfg


@pytest.mark.skipif(
    torch.cuda.is_available(), reason='the CPU path runs without CUDA only')
def test_cpu_launch_uses_gloo_and_no_device_ids(monkeypatch, helpers):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(helpers.free_port()))
    cfg = Config(
        dict(
            launcher='pytorch',
            env_cfg=dict(dist_cfg=dict(backend='nccl', timeout=60))))
    try:
        prepare_distributed(cfg)
        assert torch_dist.is_initialized()
        assert torch_dist.get_backend() == 'gloo'
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    assert cfg.model_wrapper_cfg.device_ids is None
    assert cfg.model_wrapper_cfg.type == 'MMDistributedDataParallel'
