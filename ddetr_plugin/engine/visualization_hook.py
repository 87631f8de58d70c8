"""Drawings of the detections that stay readable on small images.

MMDetection's ``DetVisualizationHook`` draws at the image's own size and
puts the ground truth and the predictions side by side in one picture.
On small images (the toy data set's are 128 px) the label texts then come
out a few pixels high and overlap each other. This hook scales an image up
before drawing, so the boxes' lines and labels keep their readable size in
pixels while the objects grow, and writes the predictions and (optionally)
the ground truth to separate files.
"""
import os.path as osp
from typing import Optional, Sequence

import mmcv
import numpy as np
from mmdet.engine.hooks import DetVisualizationHook
from mmdet.structures import DetDataSample
from mmengine.fileio import get
from mmengine.utils import mkdir_or_exist

from ..registry import HOOKS

# Longer side, in pixels, below which an image is scaled up for drawing: at
# this size mmdet's label texts and line widths are a small part of it.
DEFAULT_MIN_SIZE = 512


def scale_for_drawing(image: np.ndarray, data_sample: DetDataSample,
                      min_size: int):
    """Scale an image and the boxes of its data sample up for drawing.

    Args:
        image (np.ndarray): (height, width, 3) image at its original size,
            the size the predicted and ground-truth boxes refer to.
        data_sample (DetDataSample): Its ``pred_instances`` and
            ``gt_instances`` with (x1, y1, x2, y2) ``bboxes`` in the
            image's pixels.
        min_size (int): Smallest longer side of the drawn image; larger
            images are left as they are.

    Returns:
        tuple: The (new_height, new_width, 3) image and a copy of the data
        sample whose boxes are in its pixels.
    """
    height, width = image.shape[:2]
    if max(height, width) >= min_size:
        return image, data_sample
    scale = min_size / max(height, width)
    new_width, new_height = round(width * scale), round(height * scale)
    image = mmcv.imresize(image, (new_width, new_height))
    factors = (new_width / width, new_height / height) * 2
    # A clone shares its fields' objects: the instances are cloned too,
    # so that the model's outputs keep their boxes.
    data_sample = data_sample.clone()
    for field in ('pred_instances', 'gt_instances'):
        instances = data_sample.get(field)
        if instances is not None and 'bboxes' in instances:
            instances = instances.clone()
            instances.bboxes = instances.bboxes * instances.bboxes.new_tensor(
                factors)
            setattr(data_sample, field, instances)
    return image, data_sample


@HOOKS.register_module()
class ScaledDetVisualizationHook(DetVisualizationHook):
    """``DetVisualizationHook`` that scales small images up and writes one
    picture per file.

    Takes the arguments of MMDetection's hook (``tools/test.py --show-dir``
    sets ``draw`` and ``test_out_dir`` as for it) and:

    Args:
        min_size (int): Images whose longer side is shorter are scaled up
            to it before drawing, boxes included. Defaults to 512.
        draw_gt (bool): Also draw the ground truth, into its own file
            ``<image name>_gt<extension>`` beside the predictions'
            ``<image name><extension>`` (validation: a second picture).
            Defaults to False: predictions only.
        **kwargs: Arguments of ``DetVisualizationHook`` (``draw``,
            ``interval``, ``score_thr``, ``show``, ``wait_time``,
            ``test_out_dir``, ``backend_args``).
    """

    def __init__(self,
                 min_size: int = DEFAULT_MIN_SIZE,
                 draw_gt: bool = False,
                 **kwargs) -> None:
        if (isinstance(min_size, bool) or not isinstance(min_size, int)
                or min_size < 1):
            raise ValueError('ScaledDetVisualizationHook: min_size must be a '
                             f'positive int (pixels), got {min_size!r}')
        if not isinstance(draw_gt, bool):
            raise TypeError('ScaledDetVisualizationHook: draw_gt must be a '
                            f'bool, got {draw_gt!r}')
        super().__init__(**kwargs)
        self.min_size = min_size
        self.draw_gt = draw_gt
        self._out_dir: Optional[str] = None

    def _read_image(self, data_sample: DetDataSample) -> np.ndarray:
        image_bytes = get(data_sample.img_path, backend_args=self.backend_args)
        return mmcv.imfrombytes(image_bytes, channel_order='rgb')

    def _draw(self, name: str, data_sample: DetDataSample, step: int,
              out_file: Optional[str]) -> None:
        """Draw the predictions, then the ground truth if asked, each into
        its own picture."""
        image, scaled = scale_for_drawing(
            self._read_image(data_sample), data_sample, self.min_size)
        pictures = [(name, False, True, out_file)]
        if self.draw_gt and 'gt_instances' in scaled:
            gt_file = None
            if out_file is not None:
                stem, extension = osp.splitext(out_file)
                gt_file = f'{stem}_gt{extension}'
            pictures.append((f'{name}_gt', True, False, gt_file))
        for picture_name, draw_gt, draw_pred, picture_file in pictures:
            self._visualizer.add_datasample(
                picture_name,
                image,
                data_sample=scaled,
                draw_gt=draw_gt,
                draw_pred=draw_pred,
                show=self.show,
                wait_time=self.wait_time,
                pred_score_thr=self.score_thr,
                out_file=picture_file,
                step=step)

    def after_val_iter(self, runner, batch_idx: int, data_batch: dict,
                       outputs: Sequence[DetDataSample]) -> None:
        """Draw the first image of every ``interval``-th validation batch
        for the visualizer's backends.

        Args:
            runner (Runner): The runner of the validation.
            batch_idx (int): Index of the batch in the validation loop.
            data_batch (dict): The batch from the data loader.
            outputs (Sequence[DetDataSample]): Its predictions.
        """
        if not self.draw:
            return
        step = runner.iter + batch_idx
        if step % self.interval == 0:
            name = (
                osp.basename(outputs[0].img_path) if self.show else 'val_img')
            self._draw(name, outputs[0], step, None)

    def after_test_iter(self, runner, batch_idx: int, data_batch: dict,
                        outputs: Sequence[DetDataSample]) -> None:
        """Draw every test image, into ``test_out_dir`` when it is set.

        Args:
            runner (Runner): The runner of the test.
            batch_idx (int): Index of the batch in the test loop.
            data_batch (dict): The batch from the data loader.
            outputs (Sequence[DetDataSample]): Its predictions.
        """
        if not self.draw:
            return
        if self.test_out_dir is not None and self._out_dir is None:
            # Relative to the run's folder, as in DetVisualizationHook; an
            # absolute test_out_dir is kept as it is.
            self._out_dir = osp.join(runner.work_dir, runner.timestamp,
                                     self.test_out_dir)
            mkdir_or_exist(self._out_dir)
        for data_sample in outputs:
            self._test_index += 1
            name = osp.basename(data_sample.img_path)
            out_file = (
                osp.join(self._out_dir, name)
                if self._out_dir is not None else None)
            self._draw(name if self.show else 'test_img', data_sample,
                       self._test_index, out_file)
