"""Shared pieces of the end-to-end tests of the tools.

The tests train a deliberately tiny Deformable DETR (one encoder and one
decoder layer of 32 channels, a ResNet-18 of width 8) on a few generated
toy images, so that a run takes seconds on a CPU. The tiny config inherits
the toy config and changes only sizes, so the tools, hooks, data set and
model code paths are those of ``make demo``.
"""
import json
import os
import os.path as osp
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, Optional, Sequence

import pytest

from testkit import PLUGIN_LINES, REPO, load_script

HERE = osp.dirname(osp.abspath(__file__))
TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'deformable-detr_toy.py')

TINY_CONFIG = '''
_base_ = {base!r}
data_root = {data_root!r}
custom_imports = dict(
    imports=['ddetr_plugin', 'ddetr_plugin.engine', 'tool_test_hooks'],
    allow_failed_imports=False)
model = dict(
    num_queries=10,
    backbone=dict(base_channels=8),
    neck=dict(in_channels=[16, 32, 64], out_channels=32, num_groups=8),
    transformer=dict(
        encoder=dict(
            num_layers=1,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=32, num_heads=2),
                ffn_cfg=dict(embed_dims=32, feedforward_channels=64))),
        decoder=dict(
            num_layers=1,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=32, num_heads=2),
                cross_attn_cfg=dict(embed_dims=32, num_heads=2),
                ffn_cfg=dict(embed_dims=32, feedforward_channels=64))),
        positional_encoding=dict(num_feats=16)),
    bbox_head=dict(embed_dims=32))
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root))
val_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
train_cfg = dict(max_epochs={max_epochs}, val_interval={val_interval})
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4),
    dict(type='MultiStepLR', begin=0, end={max_epochs}, by_epoch=True,
         milestones=[{milestone}], gamma=0.1)
]
default_hooks = dict(logger=dict(interval=1))
custom_hooks = [
    dict(type='StateDumpHook'),
    dict(type='PauseHook'),
    dict(type='InterruptSaveHook')
]
log_processor = dict(window_size=1)
'''

# mmdet's config, shrunk to toy size, in mmdet's scope: the header, the
# model ({model}: by default mmdet's refinement variant) and the toy data
# and schedule.
MMDET_TINY = '''
_base_ = {base!r}
# Only so that mmdet's tools can read MMEngine checkpoints on torch >= 2.6
# (weights-only loading); without _scope_ the model stays mmdet's.
custom_imports = dict(imports=['ddetr_plugin'], allow_failed_imports=False)
data_root = {data_root!r}
classes = {classes!r}
{model}pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(128, 128), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape',
                                          'img_shape', 'scale_factor'))
]
split = dict(data_root=data_root, metainfo=dict(classes=classes),
             pipeline=pipeline)
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    batch_sampler=None,
    dataset=dict(split, ann_file='annotations/instances_train.json',
                 data_prefix=dict(img='train/'),
                 filter_cfg=dict(filter_empty_gt=False)))
val_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False,
    dataset=dict(split, ann_file='annotations/instances_val.json',
                 data_prefix=dict(img='val/')))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator
optim_wrapper = dict(optimizer=dict(lr=1e-3))
train_cfg = dict(max_epochs={max_epochs}, val_interval=10)
param_scheduler = []
default_hooks = dict(logger=dict(interval=1))
randomness = dict(seed=0)
'''
MMDET_TINY_MODEL = '''
layer = dict(embed_dims=32, num_heads=2, dropout=0.0)
ffn = dict(embed_dims=32, feedforward_channels=64, ffn_drop=0.0)
model = dict(
    num_queries=10,
    data_preprocessor=dict(mean=[127.5] * 3, std=[64.0] * 3),
    backbone=dict(depth=18, base_channels=8, frozen_stages=-1,
                  norm_cfg=dict(requires_grad=True), norm_eval=False,
                  init_cfg=None),
    neck=dict(in_channels=[16, 32, 64], out_channels=32,
              norm_cfg=dict(num_groups=8)),
    encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=layer,
                                              ffn_cfg=ffn)),
    decoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=layer,
                                              cross_attn_cfg=layer,
                                              ffn_cfg=ffn)),
    positional_encoding=dict(num_feats=16),
    bbox_head=dict(num_classes=len(classes), embed_dims=32))
'''
# Box refinement: mmdet's two-stage variant only fits 256 channels.
MMDET_BASE = ('mmdet::deformable_detr/'
              'deformable-detr-refine_r50_16xb2-50e_coco.py')


def toy_classes(toy_data: str) -> tuple:
    """The toy data set's class names, in the file's order."""
    with open(osp.join(toy_data, 'annotations', 'instances_val.json')) as f:
        return tuple(category['name']
                     for category in json.load(f)['categories'])


def write_mmdet_tiny_config(folder: str,
                            toy_data: str,
                            name: str,
                            max_epochs: int = 1,
                            plugin: bool = False,
                            classes: Optional[Sequence[str]] = None,
                            base: str = MMDET_BASE,
                            model: str = MMDET_TINY_MODEL) -> str:
    """mmdet's tiny config (``base`` shrunk by the ``model`` text, of
    ``classes``, all toy classes by default); with ``plugin``, a config
    inheriting it and adding only the plugin's two lines."""
    path = osp.join(folder, name)
    mmdet_path = path[:-3] + '_mmdet.py' if plugin else path
    with open(mmdet_path, 'w') as file:
        file.write(
            MMDET_TINY.format(
                base=base,
                model=model,
                data_root=toy_data.rstrip('/') + '/',
                classes=tuple(classes or toy_classes(toy_data)),
                max_epochs=max_epochs))
    if plugin:
        with open(path, 'w') as file:
            file.write(PLUGIN_LINES.format(base=mmdet_path))
    return path


@pytest.fixture(scope='session')
def toy_data(tmp_path_factory) -> str:
    """Eight training and four validation toy images."""
    out_dir = str(tmp_path_factory.mktemp('toy_data'))
    load_script('tools/misc/make_toy_dataset.py').generate(
        out_dir, seed=3, num_train=8, num_val=4)
    return out_dir


def write_tiny_config(folder: str,
                      data_root: str,
                      max_epochs: int = 2,
                      val_interval: int = 1,
                      extra: str = '') -> str:
    """Write a tiny config inheriting the toy config into ``folder``."""
    path = osp.join(folder, 'tiny_config.py')
    with open(path, 'w') as file:
        file.write(
            TINY_CONFIG.format(
                base=TOY_CONFIG,
                data_root=data_root.rstrip('/') + '/',
                max_epochs=max_epochs,
                val_interval=val_interval,
                milestone=max(1, max_epochs - 1)) + extra)
    return path


def tool_environment(extra: Optional[Dict[str, str]] = None) -> dict:
    """Environment of a tool subprocess: the checkout and this folder are
    importable, one thread per process keeps the two cores shared fairly."""
    env = dict(os.environ)
    paths = [REPO, HERE
             ] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
    env['PYTHONPATH'] = os.pathsep.join(paths)
    env.setdefault('OMP_NUM_THREADS', '1')
    env['PYTHONUNBUFFERED'] = '1'
    env.update(extra or {})
    return env


def run_tool(arguments: Sequence[str],
             timeout: float = 240,
             check: bool = True,
             env: Optional[Dict[str, str]] = None,
             cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run ``python <arguments>`` from the repository; output is captured.

    With ``check``, a failure shows the tail of the output.
    """
    result = subprocess.run(
        [sys.executable] + list(arguments),
        cwd=cwd or REPO,
        env=tool_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f'{" ".join(arguments)} exited with '
                    f'{result.returncode}:\n{result.stdout[-6000:]}')
    return result


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


@pytest.fixture(scope='session')
def helpers() -> SimpleNamespace:
    """The functions above, for test modules (which cannot import this
    conftest under ``--import-mode=importlib``)."""
    return SimpleNamespace(
        repo=REPO,
        write_tiny_config=write_tiny_config,
        write_mmdet_tiny_config=write_mmdet_tiny_config,
        toy_classes=toy_classes,
        run_tool=run_tool,
        tool_environment=tool_environment,
        free_port=free_port)
