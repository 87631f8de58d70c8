"""tools/analysis_tools/vis_attention_maps.py: pictures, numbers, bad inputs.

A tiny Conditional DETR inheriting the toy config (random weights, saved as
a checkpoint) runs through the command line as a user runs it, and through
the tool's ``main`` for the inputs it must refuse.
"""
import json
import os.path as osp

import pytest
import torch
from mmengine.registry import DefaultScope
from PIL import Image

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import CheckpointMismatchError
from ddetr_plugin.engine import launch
from ddetr_plugin.registry import MODELS
from testkit import REPO, load_script

TOOL = osp.join('tools', 'analysis_tools', 'vis_attention_maps.py')
TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'conditional-detr_toy.py')
# The toy config with 32 channels, 2 heads, 1 encoder and 2 decoder
# layers; its 128-px test images give the DC5 backbone an 8 x 8 map.
TINY_CONFIG = '''
_base_ = {base!r}
data_root = {data_root!r}
attention = dict(embed_dims=32, num_heads=2)
ffn = dict(embed_dims=32, feedforward_channels=64)
model = dict(
    num_queries=10,
    backbone=dict(base_channels=8),
    neck=dict(in_channels=[64], out_channels=32),
    transformer=dict(
        encoder=dict(num_layers=1,
                     layer_cfg=dict(self_attn_cfg=attention, ffn_cfg=ffn)),
        decoder=dict(num_layers=2,
                     layer_cfg=dict(self_attn_cfg=attention,
                                    cross_attn_cfg=attention, ffn_cfg=ffn)),
        positional_encoding=dict(num_feats=16)),
    bbox_head=dict(embed_dims=32))
test_dataloader = dict(dataset=dict(data_root=data_root))
'''
NUM_HEADS = 2
FEATURE_SHAPE = (8, 8)

tool = load_script(TOOL)


def _save_model(config: str, checkpoint: str) -> None:
    cfg = launch.load_config(config)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    model.init_weights()
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(dataset_meta=dict(classes=cfg.classes))), checkpoint)


@pytest.fixture(scope='module')
def tiny(toy_data, tmp_path_factory):
    """(config, checkpoint, an image) of the tiny Conditional DETR."""
    folder = str(tmp_path_factory.mktemp('attention_maps_tiny'))
    config = osp.join(folder, 'tiny_conditional.py')
    with open(config, 'w') as file:
        file.write(
            TINY_CONFIG.format(
                base=TOY_CONFIG, data_root=toy_data.rstrip('/') + '/'))
    checkpoint = osp.join(folder, 'tiny.pth')
    _save_model(config, checkpoint)
    return config, checkpoint, osp.join(toy_data, 'val', '000001.png')


@pytest.mark.slow
def test_command_line_on_the_tiny_model(helpers, tiny, tmp_path):
    config, checkpoint, image = tiny
    out_dir = str(tmp_path / 'maps')
    result = helpers.run_tool([
        TOOL, image, config, checkpoint, '--out-dir', out_dir, '--score-thr',
        '0', '--max-dets', '2', '--layer', '0'
    ])
    assert '_attention_maps.json' in result.stdout
    with open(osp.join(out_dir, '000001_attention_maps.json')) as file:
        summary = json.load(file)
    assert summary['decoder_layer'] == 0
    assert summary['feature_shape'] == list(FEATURE_SHAPE)
    height, width = summary['ori_shape']
    # The toy images are 128 px: 8 cells of 16 px each way.
    assert summary['cell_size'] == [width / 8, height / 8]
    assert len(summary['detections']) == 2
    for detection in summary['detections']:
        for kind in ('spatial', 'content', 'combined'):
            maps = torch.tensor(detection['maps'][kind])
            assert maps.shape == (NUM_HEADS, ) + FEATURE_SHAPE
            torch.testing.assert_close(
                maps.sum((1, 2)), torch.ones(NUM_HEADS, dtype=maps.dtype))
            # The peak is the centre of the heaviest cell, in pixels.
            for head in range(NUM_HEADS):
                row, column = divmod(int(maps[head].argmax()), 8)
                assert detection['peaks'][kind][head] == pytest.approx([
                    (column + 0.5) * 16, (row + 0.5) * 16
                ])
                assert detection['peak_weights'][kind][head] == \
                    pytest.approx(float(maps[head].max()))
        x, y = detection['reference']
        assert 0 <= x <= width and 0 <= y <= height
        with Image.open(detection['picture']) as picture:
            # A grid of 2 heads x 3 maps beside the enlarged image.
            assert picture.size[0] > 800 and picture.size[1] > 400


def test_bad_inputs_are_named(helpers, tiny, toy_data, tmp_path):
    config, checkpoint, image = tiny
    out_dir = str(tmp_path / 'out')

    def run(*arguments, image=image, config=config, checkpoint=checkpoint):
        return tool.main([image, config, checkpoint, '--out-dir', out_dir] +
                         list(arguments))

    with pytest.raises(FileNotFoundError, match='missing.png'):
        run(image=str(tmp_path / 'missing.png'))
    with pytest.raises(FileNotFoundError, match='checkpoint .*missing.pth'):
        run(checkpoint=str(tmp_path / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match='config file .*missing.py'):
        run(config=str(tmp_path / 'missing.py'))
    with pytest.raises(ValueError, match='decoder layer 2 is out of range'):
        run('--layer', '2')
    with pytest.raises(ValueError, match='decoder layer -3 is out of range'):
        run('--layer', '-3')

    # The checkpoint of another model: the plugin's usual check names it.
    state = torch.load(checkpoint, weights_only=False)['state_dict']
    state = {
        key: value
        for key, value in state.items() if not key.startswith('transformer.')
    }
    other_checkpoint = str(tmp_path / 'no_transformer.pth')
    torch.save(dict(state_dict=state), other_checkpoint)
    with pytest.raises(
            CheckpointMismatchError, match='no_transformer.pth.*does not fit'):
        run(checkpoint=other_checkpoint)

    # A Deformable DETR (its own tiny config and weights) is sent to the
    # sampling-point tool.
    deformable_config = helpers.write_tiny_config(
        str(tmp_path),
        toy_data,
        extra="\ncustom_imports = dict(imports=['ddetr_plugin'], "
        'allow_failed_imports=False)\n')
    deformable_checkpoint = str(tmp_path / 'deformable.pth')
    _save_model(deformable_config, deformable_checkpoint)
    with pytest.raises(TypeError, match='vis_sampling_points.py'):
        run(config=deformable_config, checkpoint=deformable_checkpoint)
    assert not osp.exists(out_dir)
