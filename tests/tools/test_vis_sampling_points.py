"""tools/analysis_tools/vis_sampling_points.py: pictures and bad inputs.

The tiny toy model (random weights, saved as a checkpoint) runs through the
command line; the three R50 configs (random weights, images resized to
160 px) run through the tool's ``visualize``.
"""
import json
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope
from PIL import Image

import ddetr_plugin  # noqa: F401
from ddetr_plugin.converters import CheckpointMismatchError
from ddetr_plugin.engine import launch
from ddetr_plugin.registry import MODELS
from testkit import REPO, load_script

TOOL = osp.join('tools', 'analysis_tools', 'vis_sampling_points.py')
CONFIGS = osp.join(REPO, 'configs', 'deformable_detr')
R50_CONFIGS = ('deformable-detr_r50_16xb2-50e_coco.py',
               'deformable-detr-refine_r50_16xb2-50e_coco.py',
               'deformable-detr-refine-twostage_r50_16xb2-50e_coco.py')
# The tiny config imports a test-only hook module; the tool needs none.
PLUGIN_ONLY = ("\ncustom_imports = dict(imports=['ddetr_plugin'], "
               'allow_failed_imports=False)\n')

tool = load_script(TOOL)


@pytest.fixture(scope='module')
def tiny(helpers, toy_data, tmp_path_factory):
    """(config, checkpoint, an image) of the tiny toy model."""
    folder = str(tmp_path_factory.mktemp('vis_tiny'))
    config = helpers.write_tiny_config(folder, toy_data, extra=PLUGIN_ONLY)
    cfg = launch.load_config(config)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model)
    model.init_weights()
    checkpoint = osp.join(folder, 'tiny.pth')
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(dataset_meta=dict(classes=cfg.classes))), checkpoint)
    return config, checkpoint, osp.join(toy_data, 'val', '000001.png')


def _check_summary(summary, num_detections, points_shape, reference_size):
    assert len(summary['detections']) == num_detections
    for detection in summary['detections']:
        points = torch.tensor(detection['points'])
        weights = torch.tensor(detection['weights'])
        assert tuple(points.shape) == points_shape + (2, )
        assert tuple(weights.shape) == points_shape
        # Each head's weights sum to 1 over its levels and points.
        torch.testing.assert_close(
            weights.sum((1, 2)),
            torch.ones(points_shape[0], dtype=weights.dtype))
        assert len(detection['reference']) == reference_size
        # Points outside the image are counted (and drawn on its border).
        height, width = summary['ori_shape']
        x, y = points[..., 0], points[..., 1]
        outside = (x < 0) | (x > width) | (y < 0) | (y > height)
        assert detection['outside'] == int(outside.sum())
        with Image.open(detection['picture']) as picture:
            # The 128-px toy image is drawn enlarged.
            assert min(picture.size) > 400
    assert osp.isfile(summary['overview'])


@pytest.mark.slow
def test_command_line_on_the_tiny_toy_model(helpers, tiny, tmp_path):
    config, checkpoint, image = tiny
    out_dir = str(tmp_path / 'points')
    result = helpers.run_tool([
        TOOL, image, config, checkpoint, '--out-dir', out_dir, '--score-thr',
        '0', '--max-dets', '3', '--encoder-pixel', '70', '20'
    ])
    assert 'encoder query' in result.stdout
    with open(osp.join(out_dir, '000001_sampling_points.json')) as file:
        summary = json.load(file)
    # Tiny config: 1 decoder layer, 2 heads, the toy's 4 levels, 4 points;
    # two-stage, so the reference is a box.
    assert summary['decoder_layer'] == 0
    _check_summary(summary, 3, (2, 4, 4), 4)
    assert [detection['class_name']
            for detection in summary['detections']] == [
                Config.fromfile(config).classes[detection['label']]
                for detection in summary['detections']
            ]
    encoder = summary['encoder']
    # The query's reference is the centre of the level-0 cell (stride 8)
    # holding pixel (70, 20).
    assert encoder['reference'] == pytest.approx([68.0, 20.0], abs=1e-3)
    assert osp.isfile(encoder['picture'])
    assert len(summary['detections']) == 3
    assert osp.isfile(osp.join(out_dir, '000001_det2.png'))


@pytest.mark.parametrize('config_name', R50_CONFIGS)
def test_r50_configs_with_random_weights(config_name, toy_data, tmp_path):
    cfg = Config.fromfile(osp.join(CONFIGS, config_name))
    cfg.model.backbone.init_cfg = None
    pipeline = cfg.test_dataloader.dataset.pipeline
    for transform in pipeline:
        if transform['type'] == 'Resize':
            transform['scale'] = (160, 160)
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        model = MODELS.build(cfg.model).eval()
    summary = tool.visualize(
        model,
        pipeline,
        osp.join(toy_data, 'val', '000002.png'),
        str(tmp_path),
        score_thr=0.0,
        max_dets=2,
        encoder_pixel=[5.0, 120.0])
    plain = config_name == R50_CONFIGS[0]
    # 8 heads, 4 levels, 4 points; the last layer's reference is a point
    # without refinement, a box with it.
    _check_summary(summary, 2, (8, 4, 4), 2 if plain else 4)
    assert summary['decoder_layer'] == 5
    assert len(summary['encoder']['points']) == 8


def test_bad_inputs_are_named(tiny, tmp_path):
    config, checkpoint, image = tiny
    out_dir = str(tmp_path / 'out')

    def run(*arguments, image=image, checkpoint=checkpoint):
        return tool.main([image, config, checkpoint, '--out-dir', out_dir] +
                         list(arguments))

    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not an image')
    with pytest.raises(ValueError, match='could not read image .*broken'):
        run(image=str(broken))
    with pytest.raises(FileNotFoundError, match='missing.png'):
        run(image=str(tmp_path / 'missing.png'))
    with pytest.raises(ValueError, match='decoder layer 1 is out of range'):
        run('--layer', '1')
    with pytest.raises(ValueError, match='encoder layer -2 is out of range'):
        run('--encoder-pixel', '3', '3', '--encoder-layer', '-2')
    with pytest.raises(
            ValueError, match=r'\(128, 3\) is outside image .*128 x 128'):
        run('--encoder-pixel', '128', '3')

    state = torch.load(checkpoint, weights_only=False)['state_dict']
    other = {
        key: value
        for key, value in state.items() if key.startswith('backbone.')
    }
    other['rpn_head.rpn_conv.weight'] = torch.zeros(3)
    other_checkpoint = str(tmp_path / 'faster_rcnn.pth')
    torch.save(dict(state_dict=other), other_checkpoint)
    with pytest.raises(
            CheckpointMismatchError, match='faster_rcnn.pth.*does not fit'):
        run(checkpoint=other_checkpoint)
    assert not osp.exists(out_dir)


def test_labels_of_overlapping_detections_do_not_hide_each_other():
    import itertools

    import matplotlib.pyplot as plt
    import numpy as np

    from ddetr_plugin.visualization import drawing
    figure, axes = plt.subplots(figsize=(6, 4), dpi=drawing.DPI)
    axes.imshow(np.zeros((96, 160, 3), np.uint8), extent=(0, 160, 96, 0))
    box = np.array([40.0, 30.0, 100.0, 80.0])
    # Three detections of one object, one nearly on it, and one touching
    # the image's top edge, whose label must stay in the picture.
    boxes = [box, box, box + 1.5, box + np.array([2.0, -1.0, 0.0, 0.0])]
    boxes.append(np.array([10.0, 0.0, 50.0, 20.0]))
    labels = [(b, f'{index}: class {index} 0.{index}9', 'red')
              for index, b in enumerate(boxes)]
    artists = drawing.place_box_labels(axes, labels)
    renderer = figure.canvas.get_renderer()
    extents = [artist.get_window_extent(renderer) for artist in artists]
    for first, second in itertools.combinations(range(len(extents)), 2):
        assert not extents[first].overlaps(extents[second]), (first, second)
    axes_extent = axes.get_window_extent(renderer)
    assert extents[-1].y1 <= axes_extent.y1
    # Each label starts at its box's left edge.
    for artist, (b, _, _) in zip(artists, labels):
        assert artist.xy == (b[0], b[1])
    plt.close(figure)
