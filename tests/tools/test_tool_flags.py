"""Command-line flags of tools/train.py and tools/test.py, without running.

The flags must mean what they mean in MMDetection's tools, and flags that
cannot work here must be refused with a message saying why.
"""

import pytest
import torch

from testkit import load_script


def _load_tool(name):
    return load_script(f'tools/{name}.py', f'tool_{name}')


train_tool = _load_tool('train')
test_tool = _load_tool('test')

CONFIG = '''
default_scope = 'mmdet'
model = dict(type='ResNet', depth=18)
optim_wrapper = dict(
    type='OptimWrapper', optimizer=dict(type='SGD', lr=0.01))
env_cfg = dict(dist_cfg=dict(backend='nccl'))
default_hooks = dict(visualization=dict(type='DetVisualizationHook'))
'''


@pytest.fixture
def config(tmp_path):
    path = tmp_path / 'config.py'
    path.write_text(CONFIG)
    return str(path)


def _train_cfg(argv):
    return train_tool.configure(train_tool.parse_args(argv))


def test_train_defaults(config, tmp_path):
    cfg = _train_cfg([config, '--work-dir', str(tmp_path / 'work')])
    assert cfg.default_scope == 'ddetr_plugin'
    assert cfg.work_dir == str(tmp_path / 'work')
    assert cfg.launcher == 'none'
    assert not cfg.get('resume', False)


def test_resume_without_a_path_uses_last_checkpoint(config):
    cfg = _train_cfg([config, '--resume'])
    assert cfg.resume is True and cfg.load_from is None


def test_resume_from_a_path(config, tmp_path):
    checkpoint = tmp_path / 'epoch_3.pth'
    checkpoint.write_bytes(b'')
    cfg = _train_cfg([config, '--resume', str(checkpoint)])
    assert cfg.resume is True and cfg.load_from == str(checkpoint)


def test_resume_from_a_missing_path_is_refused(config, tmp_path):
    with pytest.raises(FileNotFoundError, match='epoch_9.pth'):
        _train_cfg([config, '--resume', str(tmp_path / 'epoch_9.pth')])


def test_cfg_options_override_the_file(config):
    cfg = _train_cfg([config, '--cfg-options', 'model.depth=50'])
    assert cfg.model.depth == 50


def test_auto_scale_lr_needs_a_base_batch_size(config):
    with pytest.raises(ValueError, match='base_batch_size'):
        _train_cfg([config, '--auto-scale-lr'])
    cfg = _train_cfg([
        config, '--auto-scale-lr', '--cfg-options',
        'auto_scale_lr.base_batch_size=16'
    ])
    assert cfg.auto_scale_lr.enable is True


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only refusal')
def test_amp_without_a_gpu_is_refused(config):
    with pytest.raises(ValueError, match='--amp .* needs a GPU'):
        _train_cfg([config, '--amp'])


def test_local_rank_flag_is_accepted_in_both_spellings(config):
    assert train_tool.parse_args([config, '--local-rank', '1']).local_rank == 1
    assert train_tool.parse_args([config, '--local_rank', '2']).local_rank == 2


def test_test_tool_loads_the_checkpoint_and_draws(config, tmp_path):
    checkpoint = tmp_path / 'model.pth'
    checkpoint.write_bytes(b'')
    args = test_tool.parse_args(
        [config, str(checkpoint), '--show-dir', 'drawn'])
    cfg = test_tool.configure(args)
    assert cfg.load_from == str(checkpoint)
    assert cfg.default_hooks.visualization.draw is True
    assert cfg.default_hooks.visualization.test_out_dir == 'drawn'


def test_test_tool_refuses_a_missing_checkpoint(config, tmp_path):
    args = test_tool.parse_args([config, str(tmp_path / 'none.pth')])
    with pytest.raises(FileNotFoundError, match='none.pth'):
        test_tool.configure(args)


def test_test_tool_out_must_be_a_pickle(config):
    with pytest.raises(SystemExit):
        test_tool.parse_args([config, 'model.pth', '--out', 'results.json'])


def test_test_tool_show_needs_a_display(config, monkeypatch):
    monkeypatch.delenv('DISPLAY', raising=False)
    monkeypatch.delenv('WAYLAND_DISPLAY', raising=False)
    monkeypatch.setattr('sys.platform', 'linux')
    with pytest.raises(SystemExit):
        test_tool.parse_args([config, 'model.pth', '--show'])
