"""A checkpoint of another model is refused with the keys that differ."""
import pytest
import torch
from torch import nn

from ddetr_plugin.engine.checkpoint_check import (CheckpointMismatchError,
                                                  check_checkpoint_matches,
                                                  compare_state_dicts)


class TwoLayers(nn.Module):

    def __init__(self, width=4):
        super().__init__()
        self.first = nn.Linear(3, width)
        self.second = nn.Linear(width, 2)


def _save(tmp_path, state, name='model.pth', wrap=True):
    path = str(tmp_path / name)
    torch.save(dict(state_dict=state, meta={}) if wrap else state, path)
    return path


def test_matching_checkpoint_passes(tmp_path):
    model = TwoLayers()
    check_checkpoint_matches(model, _save(tmp_path, model.state_dict()))
    # Plain state dicts and DataParallel prefixes are accepted too.
    check_checkpoint_matches(
        model, _save(tmp_path, model.state_dict(), 'plain.pth', wrap=False))
    prefixed = {
        f'module.{key}': value
        for key, value in model.state_dict().items()
    }
    check_checkpoint_matches(model, _save(tmp_path, prefixed, 'ddp.pth'))


def test_compare_lists_missing_unexpected_and_reshaped_keys():
    model = TwoLayers().state_dict()
    saved = dict(TwoLayers(width=5).state_dict())
    del saved['second.bias']
    saved['third.weight'] = torch.zeros(1)
    differences = compare_state_dicts(model, saved)
    assert differences['missing'] == ['second.bias']
    assert differences['unexpected'] == ['third.weight']
    assert differences['mismatched'] == [
        'first.bias: (5,) in the checkpoint vs (4,) in the model',
        'first.weight: (5, 3) in the checkpoint vs (4, 3) in the model',
        'second.weight: (2, 5) in the checkpoint vs (2, 4) in the model'
    ]


def test_other_model_raises_naming_file_and_keys(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    path = _save(tmp_path, other.state_dict(), 'resnet.pth')
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_matches(TwoLayers(), path)
    message = str(error.value)
    assert 'resnet.pth' in message and 'TwoLayers' in message
    assert '4 missing keys' in message and 'first.weight' in message
    assert '2 unexpected keys' in message and '0.weight' in message


def test_long_key_lists_are_shortened(tmp_path):
    many = {f'layer{index}.weight': torch.zeros(1) for index in range(25)}
    with pytest.raises(CheckpointMismatchError, match=r'\(15 more\)'):
        check_checkpoint_matches(TwoLayers(), _save(tmp_path, many))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.pth'):
        check_checkpoint_matches(TwoLayers(), str(tmp_path / 'nothing.pth'))


# A few keys of each layout, as their state dicts name them.
MMDET_KEYS = [
    'backbone.conv1.weight', 'neck.convs.0.conv.weight',
    'encoder.layers.0.self_attn.sampling_offsets.weight', 'level_embed',
    'bbox_head.cls_branches.0.weight'
]
OFFICIAL_KEYS = [
    'backbone.0.body.conv1.weight', 'input_proj.0.0.weight',
    'transformer.level_embed', 'class_embed.0.weight'
]
PLUGIN_KEYS = [
    'backbone.conv1.weight', 'neck.projections.0.conv.weight',
    'transformer.encoder.layers.0.self_attn.sampling_offsets.weight',
    'transformer.level_embed', 'bbox_head.cls_branches.0.weight'
]


def test_official_layout_names_the_converter(tmp_path):
    path = _save(tmp_path, {key: torch.zeros(1)
                            for key in OFFICIAL_KEYS}, 'zoo.pth')
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_matches(TwoLayers(), path, 'my_config.py')
    message = str(error.value)
    assert f'tools/model_converters/official_to_plugin.py {path}' in message
    assert '--config my_config.py' in message


def test_mmdet_layout_that_does_not_fit_is_refused_strictly(tmp_path):
    # mmdet's weights are converted in memory; what still does not fit the
    # model is listed, as for any other checkpoint.
    path = _save(tmp_path, {key: torch.zeros(1)
                            for key in MMDET_KEYS}, 'zoo.pth')
    with pytest.raises(CheckpointMismatchError) as error:
        check_checkpoint_matches(TwoLayers(), path)
    message = str(error.value)
    assert 'zoo.pth' in message and 'MMDetection 3.x' in message
    assert 'first.weight' in message
    assert 'transformer.encoder.layers.0.self_attn' in message


def test_own_layout_must_fit_exactly(tmp_path):
    # load_from and --resume get the same strict check as tools/test.py.
    path = _save(tmp_path, {key: torch.zeros(1) for key in PLUGIN_KEYS})
    with pytest.raises(CheckpointMismatchError, match='missing keys'):
        check_checkpoint_matches(TwoLayers(), path)


class TinyHead(nn.Module):
    """Keys named like the detector's: a box branch and class branches."""

    def __init__(self, num_classes):
        super().__init__()
        self.bbox_head = nn.Module()
        self.bbox_head.reg_branches = nn.ModuleList([nn.Linear(4, 4)])
        self.bbox_head.cls_branches = nn.ModuleList(
            [nn.Linear(4, num_classes) for _ in range(2)])


def test_fine_tuning_may_change_only_the_class_count(tmp_path):
    from mmengine.runner.checkpoint import load_checkpoint
    path = _save(tmp_path, TinyHead(num_classes=80).state_dict())
    model = TinyHead(num_classes=3)
    initial = model.bbox_head.cls_branches[0].weight.detach().clone()
    # Refused by default (tools/test.py, --resume) ...
    with pytest.raises(CheckpointMismatchError, match='cls_branches'):
        check_checkpoint_matches(model, path)
    # ... accepted for load_from, and MMEngine's load then keeps the
    # class layers at their initial values and loads everything else.
    check_checkpoint_matches(model, path, allow_class_change=True)
    load_checkpoint(model, path, strict=False)
    saved = torch.load(path)['state_dict']
    assert torch.equal(model.bbox_head.cls_branches[0].weight, initial)
    assert torch.equal(model.bbox_head.reg_branches[0].weight,
                       saved['bbox_head.reg_branches.0.weight'])


def test_class_change_does_not_excuse_other_differences(tmp_path):
    state = TinyHead(num_classes=80).state_dict()
    state['bbox_head.reg_branches.0.weight'] = torch.zeros(5, 4)
    with pytest.raises(CheckpointMismatchError, match='reg_branches'):
        check_checkpoint_matches(
            TinyHead(num_classes=3),
            _save(tmp_path, state),
            allow_class_change=True)
