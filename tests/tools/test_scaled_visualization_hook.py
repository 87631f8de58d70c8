"""ScaledDetVisualizationHook: small images are scaled up before drawing,
and each picture goes to a file of its own."""
import os
from types import SimpleNamespace

import mmcv
import numpy as np
import pytest
import torch
from mmdet.structures import DetDataSample
from mmdet.visualization import DetLocalVisualizer
from mmengine.structures import InstanceData

from ddetr_plugin.engine import ScaledDetVisualizationHook
from ddetr_plugin.engine.visualization_hook import scale_for_drawing


def _sample(image_path=''):
    sample = DetDataSample(metainfo=dict(img_path=image_path))
    # One box, x from 10 to 60 and y from 20 to 80 in the 128 px image.
    sample.pred_instances = InstanceData(
        bboxes=torch.tensor([[10., 20., 60., 80.]]),
        scores=torch.tensor([0.9]),
        labels=torch.tensor([1]))
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[12., 22., 58., 78.]]), labels=torch.tensor([1]))
    return sample


def test_scale_for_drawing_scales_image_and_boxes_of_a_copy():
    image = np.zeros((128, 96, 3), np.uint8)
    sample = _sample()
    scaled_image, scaled = scale_for_drawing(image, sample, min_size=512)
    assert scaled_image.shape == (512, 384, 3)
    torch.testing.assert_close(scaled.pred_instances.bboxes,
                               torch.tensor([[40., 80., 240., 320.]]))
    torch.testing.assert_close(scaled.gt_instances.bboxes,
                               torch.tensor([[48., 88., 232., 312.]]))
    # The model's outputs are left as they were.
    torch.testing.assert_close(sample.pred_instances.bboxes,
                               torch.tensor([[10., 20., 60., 80.]]))
    # Large enough images are drawn as they are.
    large = np.zeros((600, 800, 3), np.uint8)
    assert scale_for_drawing(large, sample, 512)[0] is large


@pytest.fixture
def visualizer():
    instance = DetLocalVisualizer.get_instance(
        f'scaled_hook_test_{os.getpid()}_{id(object())}')
    instance.dataset_meta = dict(
        classes=('square', 'circle'), palette=[(255, 0, 0), (0, 255, 0)])
    return instance


@pytest.mark.parametrize('draw_gt', [False, True])
def test_test_images_are_drawn_scaled_one_per_file(tmp_path, visualizer,
                                                   draw_gt):
    image_path = str(tmp_path / 'image.png')
    mmcv.imwrite(np.zeros((128, 128, 3), np.uint8), image_path)
    hook = ScaledDetVisualizationHook(
        draw=True, test_out_dir='drawn', draw_gt=draw_gt, score_thr=0.3)
    runner = SimpleNamespace(work_dir=str(tmp_path), timestamp='run')
    hook.after_test_iter(runner, 0, {}, [_sample(image_path)])
    hook.after_test_iter(runner, 1, {}, [_sample(image_path)])

    out_dir = tmp_path / 'run' / 'drawn'
    expected = ['image.png'] + (['image_gt.png'] if draw_gt else [])
    assert sorted(os.listdir(out_dir)) == sorted(expected)
    drawn = mmcv.imread(str(out_dir / 'image.png'))
    # 4x the image, not a side-by-side composite of two.
    assert drawn.shape == (512, 512, 3)
    # The box is drawn where the scaled box lies (its left edge, x = 40),
    # not where the unscaled one would (x = 10).
    assert drawn[200, 38:43].any()
    assert not drawn[200, 8:13].any()
    if draw_gt:
        ground_truth = mmcv.imread(str(out_dir / 'image_gt.png'))
        assert ground_truth.shape == (512, 512, 3)
        assert ground_truth[200, 46:51].any()


def test_nothing_is_drawn_unless_asked(tmp_path, visualizer):
    hook = ScaledDetVisualizationHook(test_out_dir='drawn')
    runner = SimpleNamespace(work_dir=str(tmp_path), timestamp='run')
    hook.after_test_iter(runner, 0, {}, [_sample('missing.png')])
    assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('arguments, error', [
    (dict(min_size=0), ValueError),
    (dict(min_size='512'), ValueError),
    (dict(draw_gt='yes'), TypeError),
])
def test_bad_arguments_fail_at_construction(visualizer, arguments, error):
    with pytest.raises(error, match='ScaledDetVisualizationHook'):
        ScaledDetVisualizationHook(**arguments)
