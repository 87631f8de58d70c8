"""FeedForward takes mmcv FFN's arguments and computes what FFN computes."""
import pytest
import torch

from ddetr_plugin.models.layers import FeedForward

FFN_ARGUMENTS = [
    dict(),
    dict(act_cfg=dict(type='GELU')),
    dict(act_cfg=dict(type='ReLU', inplace=True), ffn_drop=0.0),
    dict(add_identity=False),
    dict(layer_scale_init_value=0.1),
    dict(dropout_layer=dict(type='DropPath', drop_prob=0.0)),
]


def _copy_weights(ours: FeedForward, theirs) -> None:
    """mmcv FFN's (Linear, act, Dropout) block and final Linear."""
    with torch.no_grad():
        theirs.layers[0][0].weight.copy_(ours.linear1.weight)
        theirs.layers[0][0].bias.copy_(ours.linear1.bias)
        theirs.layers[1].weight.copy_(ours.linear2.weight)
        theirs.layers[1].bias.copy_(ours.linear2.bias)


@pytest.mark.parametrize('arguments', FFN_ARGUMENTS)
def test_mmcv_ffn_arguments_give_mmcv_ffn_outputs(arguments):
    transformer = pytest.importorskip('mmcv.cnn.bricks.transformer')
    torch.manual_seed(0)
    ours = FeedForward(embed_dims=8, feedforward_channels=16, **arguments)
    theirs = transformer.FFN(
        embed_dims=8, feedforward_channels=16, **arguments)
    _copy_weights(ours, theirs)
    ours.eval()
    theirs.eval()
    query = torch.randn(2, 5, 8)
    torch.testing.assert_close(ours(query), theirs(query))
    identity = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        ours(query, identity=identity), theirs(query, identity=identity))


def test_activation_is_the_configured_one():
    ffn = FeedForward(embed_dims=8, act_cfg=dict(type='GELU'))
    assert isinstance(ffn.activation, torch.nn.GELU)
    # Without act_cfg: ReLU, the Deformable DETR block.
    assert isinstance(FeedForward(embed_dims=8).activation, torch.nn.ReLU)


def test_layer_scale_is_learnt_per_channel():
    ffn = FeedForward(embed_dims=8, layer_scale_init_value=0.5)
    assert ffn.layer_scale.shape == (8, )
    assert 'layer_scale' in dict(ffn.named_parameters())
    assert 'layer_scale' not in dict(FeedForward(8).named_parameters())


@pytest.mark.parametrize('arguments, error, message', [
    (dict(num_fcs=3), ValueError, 'num_fcs=3'),
    (dict(act_cfg='ReLU'), TypeError, 'act_cfg must be a dict'),
    (dict(add_identity=1), TypeError, 'add_identity must be a bool'),
    (dict(layer_scale_init_value=-1), ValueError, 'layer_scale_init_value'),
])
def test_bad_arguments_fail_at_construction(arguments, error, message):
    with pytest.raises(error, match=message):
        FeedForward(embed_dims=8, **arguments)
