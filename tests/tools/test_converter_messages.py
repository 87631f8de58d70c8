"""The converters' messages: damaged files and weights that do not fit.

``official_to_plugin.py`` on a truncated download must say so in one line,
as every other tool does, and a mismatch found by ``--config`` must give
the right advice in a readable number of lines.
"""
import os.path as osp
import runpy
import sys

import pytest
import torch
from torch import nn

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import CheckpointMismatchError, check_state_dict
from ddetr_plugin.converters.mmdet import MAX_LISTED
from testkit import REPO

OFFICIAL_TO_PLUGIN = osp.join(REPO, 'tools', 'model_converters',
                              'official_to_plugin.py')


def _run_converter(monkeypatch, *arguments) -> str:
    """The converter as from the command line; returns its exit message."""
    monkeypatch.setattr(sys, 'argv', [OFFICIAL_TO_PLUGIN] + list(arguments))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(OFFICIAL_TO_PLUGIN, run_name='__main__')
    return str(exit_info.value.code)


@pytest.mark.parametrize('zip_format', [True, False])
def test_official_converter_names_a_truncated_file(tmp_path, monkeypatch,
                                                   zip_format):
    whole = str(tmp_path / 'whole.pth')
    torch.save(
        dict(model={'query_embed.weight': torch.zeros(300, 512)}),
        whole,
        _use_new_zipfile_serialization=zip_format)
    truncated = str(tmp_path / 'truncated.pth')
    with open(whole, 'rb') as source, open(truncated, 'wb') as target:
        target.write(source.read()[:osp.getsize(whole) // 2])
    message = _run_converter(monkeypatch, truncated, str(tmp_path / 'out.pth'))
    assert message.startswith('official_to_plugin: error: ')
    assert 'truncated.pth' in message and 'is not a PyTorch checkpoint' in \
        message and 'truncated?' in message
    assert not osp.exists(tmp_path / 'out.pth')


class _Model(nn.Module):
    """A stand-in with parameters of the given names and shapes."""

    def __init__(self, shapes):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))


def _mismatch(model_shapes, checkpoint_shapes) -> str:
    with pytest.raises(CheckpointMismatchError) as caught:
        check_state_dict(
            _Model(model_shapes), {
                key: torch.zeros(shape)
                for key, shape in checkpoint_shapes.items()
            })
    return str(caught.value)


def test_level_embed_advice_names_what_differs():
    # Both have 4 levels; only the width differs.
    message = _mismatch({'level_embed': (4, 256)}, {'level_embed': (4, 128)})
    assert 'Set model.num_feature_levels' not in message
    assert '128 channels wide' in message and 'embed_dims' in message
    # Another number of levels.
    message = _mismatch({'level_embed': (4, 256)}, {'level_embed': (3, 256)})
    assert 'Set model.num_feature_levels=3' in message


def test_a_long_mismatch_is_truncated():
    num_keys = 240
    model = {f'layer{index}': (2, ) for index in range(num_keys)}
    message = _mismatch(model, {key: (3, ) for key in model})
    lines = message.splitlines()
    # A header, MAX_LISTED mismatches and the count of the others.
    assert len(lines) == MAX_LISTED + 2
    assert f'... and {num_keys - MAX_LISTED} more' in lines[-1]
    message = _mismatch(model, {})
    assert f'{num_keys} missing keys' in message
    assert f'({num_keys - MAX_LISTED} more)' in message
    assert 'layer{}'.format(MAX_LISTED + 5) not in message
