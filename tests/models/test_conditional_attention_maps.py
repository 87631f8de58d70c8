"""Conditional DETR's attention maps: capture, exactness and geometry.

A small Conditional DETR (DC5 ResNet-18 of width 8, one encoder and two
decoder layers of 32 channels and 2 heads) runs on a padded batch of two
images whose test-time resize was anisotropic. The combined map must be
exactly the attention each layer applied, the three maps must be
distributions over the unpadded cells, the predictions must not change,
and with hand-set weights the spatial peak must land at the original-image
pixels the reference point predicts.
"""
import math
import os.path as osp

import pytest
import torch
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.registry import DefaultScope

import ddetr_plugin  # noqa: F401
from ddetr_plugin.models.layers import ConditionalAttention
from ddetr_plugin.registry import MODELS
from ddetr_plugin.visualization.conditional_attention_maps import (
    MAP_KINDS, ConditionalAttentionCapture)
from ddetr_plugin.visualization.feature_grid import (feature_grid, peaks,
                                                     upsample)
from testkit import REPO

TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'conditional-detr_toy.py')
EMBED_DIMS = 32
NUM_HEADS = 2
# Network inputs (h, w), multiples of the DC5 stride 16: feature maps 4x6
# and 6x6. The first is padded to the second's height.
SIZES = [(64, 96), (96, 96)]
STRIDE = 16
# The test-time resize shrank x by 2 and y by 4 (keep_ratio=False).
SCALE = (0.5, 0.25)


def build():
    cfg = Config.fromfile(TOY_CONFIG)
    attention = dict(embed_dims=EMBED_DIMS, num_heads=NUM_HEADS)
    ffn = dict(embed_dims=EMBED_DIMS, feedforward_channels=64)
    cfg.merge_from_dict(
        dict(
            model=dict(
                num_queries=10,
                backbone=dict(base_channels=8),
                neck=dict(in_channels=[64], out_channels=EMBED_DIMS),
                transformer=dict(
                    encoder=dict(
                        num_layers=1,
                        layer_cfg=dict(self_attn_cfg=attention, ffn_cfg=ffn)),
                    decoder=dict(
                        num_layers=2,
                        layer_cfg=dict(
                            self_attn_cfg=attention,
                            cross_attn_cfg=attention,
                            ffn_cfg=ffn)),
                    positional_encoding=dict(num_feats=EMBED_DIMS // 2)),
                bbox_head=dict(embed_dims=EMBED_DIMS))))
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        return MODELS.build(cfg.model).eval()


def padded_batch(model):
    inputs, samples = [], []
    torch.manual_seed(1)
    for height, width in SIZES:
        inputs.append(torch.randint(0, 256, (3, height, width)).byte())
        samples.append(
            DetDataSample(
                metainfo=dict(
                    img_shape=(height, width),
                    ori_shape=(int(height / SCALE[1]), int(width / SCALE[0])),
                    scale_factor=SCALE)))
    return model.data_preprocessor(
        dict(inputs=inputs, data_samples=samples), False)


def cross_attentions(model):
    return {
        f'decoder{index}': layer.cross_attn
        for index, layer in enumerate(model.transformer.decoder.layers)
    }


def valid_keys():
    """(bs, num_keys) bool: the cells of each image's unpadded input."""
    padded_height, width = SIZES[1][0] // STRIDE, SIZES[1][1] // STRIDE
    valid = torch.zeros(len(SIZES), padded_height, width, dtype=torch.bool)
    for index, (height, _) in enumerate(SIZES):
        valid[index, :height // STRIDE] = True
    return valid.flatten(1)


def test_maps_are_distributions_over_the_unpadded_cells():
    model = build()
    data = padded_batch(model)
    with torch.no_grad():
        plain = model.test_step(data)
    modules = cross_attentions(model)
    with ConditionalAttentionCapture(modules) as capture, torch.no_grad():
        captured = model.test_step(data)
    valid = valid_keys()
    num_keys = valid.shape[1]
    for name, records in capture.records.items():
        assert len(records) == 1, name
        record = records[0]
        assert torch.equal(record.key_padding_mask, ~valid)
        for kind in MAP_KINDS:
            maps = getattr(record, kind)
            assert maps.shape == (len(SIZES), NUM_HEADS, 10, num_keys)
            torch.testing.assert_close(
                maps.sum(-1), torch.ones(len(SIZES), NUM_HEADS, 10))
            assert torch.all(maps.masked_select(~valid[:, None, None]) == 0)
            # Every unpadded cell keeps some weight.
            assert torch.all(maps.masked_select(valid[:, None, None]) > 0)
    # The predictions are the same numbers with the hooks on.
    for before, after in zip(plain, captured):
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(before.pred_instances[key],
                               after.pred_instances[key]), key
    # Closing the block removes every hook.
    for module in modules.values():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks


def test_combined_map_is_exactly_the_attention_the_layer_applied():
    model = build()
    data = padded_batch(model)
    modules = cross_attentions(model)
    outputs = {}

    def keep_output(name):

        def hook(module, args, output):
            outputs[name] = output

        return hook

    # A hook of the test's own sees what the layer returned to the model.
    handles = [
        module.register_forward_hook(keep_output(name))
        for name, module in modules.items()
    ]
    with ConditionalAttentionCapture(modules) as capture, torch.no_grad():
        model.test_step(data)
    for handle in handles:
        handle.remove()
    for name, module in modules.items():
        record = capture.records[name][0]
        # (bs, heads, queries, keys) @ (bs, heads, keys, head_dims)
        attended = record.combined @ module._heads(
            module.value_proj(record.key))
        batch_size, _, num_queries, _ = attended.shape
        merged = attended.transpose(1, 2).reshape(batch_size, num_queries,
                                                  EMBED_DIMS)
        with torch.no_grad():
            applied = record.query + module.out_proj(merged)
        torch.testing.assert_close(
            applied, outputs[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(record.output, outputs[name])
        # The content map alone is not what the layer applied.
        content = (record.content @ module._heads(
            module.value_proj(record.key))).transpose(1, 2).reshape_as(merged)
        with torch.no_grad():
            assert not torch.allclose(
                record.query + module.out_proj(content),
                outputs[name],
                atol=1e-4)


def logit(probability: float) -> float:
    return math.log(probability / (1 - probability))


def spatial_only(model, reference):
    """Hand-set weights: every query's reference point is ``reference``
    (normalised x, y); the first layer's content match is 0 and its spatial
    match compares the sine encodings of the reference and of each cell,
    so each head's spatial and combined maps peak at the cell the reference
    encodes, and its content map is flat."""
    attention = model.transformer.decoder.layers[0].cross_attn
    head = model.transformer.decoder.ref_point_head[-1]
    half = EMBED_DIMS // 2
    quarter = half // 2
    # Channels [y, x] of the encoding: head 0 reads the high frequencies of
    # y and x, head 1 the low ones, so each head sees both axes.
    channels = torch.cat([torch.arange(quarter), half +
                          torch.arange(quarter)] + [
                              quarter + torch.arange(quarter), half + quarter +
                              torch.arange(quarter)
                          ])
    selection = torch.eye(EMBED_DIMS)[channels]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([logit(value) for value in reference]))
        for linear in (attention.query_content_proj, attention.query_pos_proj):
            linear.weight.zero_()
            linear.bias.zero_()
        attention.query_sine_proj.weight.copy_(selection * 20.0)
        attention.query_sine_proj.bias.zero_()
        attention.key_pos_proj.weight.copy_(selection)
        attention.key_pos_proj.bias.zero_()
    return attention


def test_peaks_land_at_the_reference_cell_in_original_pixels():
    model = build()
    # The sine encoding puts cell (row, column) of an h x w unpadded map at
    # ((column + 1) / w, (row + 1) / h): x = 4/6 is column 3 of both
    # images (6 columns), y = 1/2 row 1 of the first (4 rows) and row 2 of
    # the second (6 rows).
    attention = spatial_only(model, (4 / 6, 1 / 2))
    expected_cells = [(1, 3), (2, 3)]
    data = padded_batch(model)
    with ConditionalAttentionCapture(dict(first=attention)) as capture, \
            torch.no_grad():
        results = model.test_step(data)
    record = capture.records['first'][0]
    valid = valid_keys()
    for index, result in enumerate(results):
        meta = result.metainfo
        grid = feature_grid((6, 6), meta)
        # A cell is 16 input pixels: 32 original pixels wide, 64 high.
        torch.testing.assert_close(
            grid.cell_size, torch.tensor([32.0, 64.0], dtype=torch.float64))
        row, column = expected_cells[index]
        centre = torch.tensor([(column + 0.5) * STRIDE / SCALE[0],
                               (row + 0.5) * STRIDE / SCALE[1]],
                              dtype=torch.float64)
        for kind in ('spatial', 'combined'):
            locations, _ = peaks(getattr(record, kind)[index, :, 0], grid)
            torch.testing.assert_close(
                locations, centre.expand(NUM_HEADS, 2), rtol=0, atol=0)
        # No content match: the content map is flat over the image's cells.
        content = record.content[index, :, 0]
        num_valid = int(valid[index].sum())
        torch.testing.assert_close(
            content[:, valid[index]],
            torch.full((NUM_HEADS, num_valid), 1 / num_valid))
        # Resampled at every original pixel, the map keeps its peak next to
        # the cell's centre, and covers the original image exactly.
        spatial = record.spatial[index, :, 0].view(NUM_HEADS, 6, 6)
        image_maps = upsample(spatial, grid)
        assert image_maps.shape == (NUM_HEADS, ) + meta['ori_shape']
        for head in range(NUM_HEADS):
            y, x = divmod(int(image_maps[head].argmax()), meta['ori_shape'][1])
            assert abs(x + 0.5 - centre[0]) <= 1 and \
                abs(y + 0.5 - centre[1]) <= 1


def test_upsampling_of_a_flat_map_stays_flat_up_to_the_padding():
    # A map of 1 over the first image's cells and 0 over its padding:
    # every original pixel reads 1 except the last cell's width before the
    # padding, where bilinear reading blends with the padded cells.
    meta = dict(
        batch_input_shape=SIZES[1],
        scale_factor=SCALE,
        ori_shape=(int(SIZES[0][0] / SCALE[1]), int(SIZES[0][1] / SCALE[0])))
    grid = feature_grid((6, 6), meta)
    maps = valid_keys()[0].view(1, 6, 6).float()
    image_maps = upsample(maps, grid)
    assert image_maps.shape == (1, 256, 192)
    # Rows up to the last valid cell's centre (3.5 cells of 64 px) read 1.
    torch.testing.assert_close(image_maps[0, :224], torch.ones(224, 192))
    assert image_maps[0, 255].max() < 1


def test_upsampling_reads_each_pixel_centre_between_cell_centres():
    # Maps equal to the column (the row) index: bilinear reading gives at
    # every pixel between the first and last cell centres the pixel
    # centre's position in cells, (x + 0.5) / cell_width - 0.5.
    meta = dict(
        batch_input_shape=SIZES[1],
        scale_factor=SCALE,
        ori_shape=(int(SIZES[1][0] / SCALE[1]), int(SIZES[1][1] / SCALE[0])))
    grid = feature_grid((6, 6), meta)
    rows, columns = torch.meshgrid(
        torch.arange(6.0), torch.arange(6.0), indexing='ij')
    image_maps = upsample(torch.stack((columns, rows)), grid)
    cell_width, cell_height = grid.cell_size.tolist()
    xs = torch.arange(int(cell_width / 2), int(5.5 * cell_width))
    ys = torch.arange(int(cell_height / 2), int(5.5 * cell_height))
    torch.testing.assert_close(image_maps[0, 0, xs],
                               (xs + 0.5) / cell_width - 0.5)
    torch.testing.assert_close(image_maps[1, ys, 0],
                               (ys + 0.5) / cell_height - 0.5)


def test_capture_refuses_what_it_cannot_record():
    with pytest.raises(TypeError, match='Linear'):
        ConditionalAttentionCapture(dict(wrong=torch.nn.Linear(2, 2)))
    with pytest.raises(TypeError, match='without cross_attn'):
        ConditionalAttentionCapture(
            dict(self_attention=ConditionalAttention(8, 2)))
    dropping = ConditionalAttention(8, 2, attn_drop=0.1, cross_attn=True)
    with pytest.raises(ValueError, match='training mode.*model.eval'):
        with ConditionalAttentionCapture(dict(dropping=dropping)):
            pass
    with ConditionalAttentionCapture(dict(dropping=dropping.eval())):
        pass


def test_feature_grid_names_missing_meta():
    with pytest.raises(KeyError, match='batch_input_shape'):
        feature_grid((4, 4), dict(scale_factor=(1, 1), ori_shape=(8, 8)))
