"""DeformableDetrNeck: levels, strides, biases, mmdet compatibility."""
import pytest
import torch

from ddetr_plugin.converters import convert_mmdet_state_dict
from ddetr_plugin.models.necks import DeformableDetrNeck


def backbone_levels(batch_size=2):
    torch.manual_seed(0)
    return [
        torch.randn(batch_size, 16, 20, 24),
        torch.randn(batch_size, 24, 10, 12),
        torch.randn(batch_size, 40, 5, 6)
    ]


def test_levels_and_sizes():
    neck = DeformableDetrNeck([16, 24, 40],
                              out_channels=32,
                              num_outs=5,
                              num_groups=8)
    outputs = neck(backbone_levels())
    assert [tuple(o.shape) for o in outputs] == [(2, 32, 20, 24),
                                                 (2, 32, 10, 12),
                                                 (2, 32, 5, 6), (2, 32, 3, 3),
                                                 (2, 32, 2, 2)]
    kernel_sizes = [p.conv.kernel_size for p in neck.projections]
    assert kernel_sizes == [(1, 1)] * 3 + [(3, 3)] * 2
    # The first extra level reads the backbone's last level.
    assert neck.projections[3].conv.in_channels == 40
    assert neck.projections[4].conv.in_channels == 32


def test_group_norm_normalises_each_level():
    neck = DeformableDetrNeck([16, 24, 40], out_channels=32, num_groups=8)
    for output in neck(backbone_levels()):
        groups = output.reshape(2, 8, -1)
        torch.testing.assert_close(
            groups.mean(-1), torch.zeros(2, 8), atol=1e-5, rtol=0)


def test_bias_follows_the_flag():
    with_bias = DeformableDetrNeck([16, 24, 40], 32, 4, num_groups=8)
    without = DeformableDetrNeck([16, 24, 40], 32, 4, num_groups=8, bias=False)
    assert all(p.conv.bias is not None for p in with_bias.projections)
    assert all(torch.all(p.conv.bias == 0) for p in with_bias.projections)
    assert all(p.conv.bias is None for p in without.projections)


def test_matches_mmdet_channel_mapper():
    necks = pytest.importorskip('mmdet.models.necks')
    torch.manual_seed(0)
    theirs = necks.ChannelMapper(
        in_channels=[16, 24, 40],
        kernel_size=1,
        out_channels=32,
        act_cfg=None,
        norm_cfg=dict(type='GN', num_groups=8),
        num_outs=4)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    ours = DeformableDetrNeck([16, 24, 40], 32, 4, num_groups=8)
    state = {
        f'neck.{key}': value
        for key, value in theirs.state_dict().items()
    }
    converted = {
        key[len('neck.'):]: value
        for key, value in convert_mmdet_state_dict(state).items()
    }
    ours.load_state_dict(converted, strict=True)
    for want, got in zip(theirs(backbone_levels()), ours(backbone_levels())):
        torch.testing.assert_close(got, want)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match='num_outs'):
        DeformableDetrNeck([16, 24, 40], 32, num_outs=2, num_groups=8)
    with pytest.raises(ValueError, match='num_groups'):
        DeformableDetrNeck([16, 24, 40], 30, num_groups=8)
    neck = DeformableDetrNeck([16, 24, 40], 32, num_groups=8)
    with pytest.raises(ValueError, match='3 backbone levels'):
        neck(backbone_levels()[:2])
    levels = backbone_levels()
    levels[1] = torch.randn(2, 20, 10, 12)
    with pytest.raises(ValueError, match='in_channels\\[1\\] is 24'):
        neck(levels)
