"""Running an exported model in ONNX Runtime, and its boxes as MMDetection
instances.

:class:`OnnxRuntimeDetector` runs a file written by ``export_onnx``;
:func:`to_instances` turns one image's ``dets``/``labels`` into the
``InstanceData`` that ``DeformableDETR.predict`` returns, with the same
clamping and rescaling; :class:`OnnxTestModel` puts the config's data
preprocessor in front, with the ``test_step`` of a detector, so the demo
and the evaluation code of MMDetection take it unchanged.
"""
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.structures import InstanceData

from .config_inputs import build_data_preprocessor
from .detection_wrapper import full_image_shapes
from .onnx_ms_deform_attn import TENSORRT_PLUGIN_NAME
from .requirements import require
from .torch_export import (IMAGE_SHAPES_NAME, INPUT_NAME, INPUT_NAMES,
                           OUTPUT_NAMES)

# ONNX Runtime's log severities: 0 verbose, 1 info, 2 warning, 3 error,
# 4 fatal.
ORT_LOG_ERROR = 3


class OnnxRuntimeDetector:
    """An exported Deformable DETR in an ONNX Runtime CPU session.

    Args:
        path (str): The ``.onnx`` file.
        num_threads (int, optional): Intra-op threads; ONNX Runtime's
            default (all cores) when None.
    """

    def __init__(self, path: str, num_threads: Optional[int] = None) -> None:
        ort = require('onnxruntime', 'Running an ONNX model')
        if not osp.isfile(path):
            raise FileNotFoundError(f'ONNX model {path!r} does not exist; '
                                    'write it with '
                                    'tools/deployment/export_onnx.py.')
        options = ort.SessionOptions()
        # Warnings off, errors on: ONNX Runtime warns once for each of the
        # exporter's CastLike nodes that it has no kernel to constant-fold
        # (about 30 coloured lines a model), which changes nothing.
        options.log_severity_level = ORT_LOG_ERROR
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.path = path
        try:
            self.session = ort.InferenceSession(
                path, options, providers=['CPUExecutionProvider'])
        except Exception as error:
            if TENSORRT_PLUGIN_NAME not in str(error):
                raise
            raise RuntimeError(
                f'{path!r} holds the deformable attention as TensorRT\'s '
                f'plugin node {TENSORRT_PLUGIN_NAME} (export_onnx.py '
                '--sampling trt_plugin), which only TensorRT runs (e.g. '
                f'`trtexec --onnx={path}`); for ONNX Runtime, export with '
                '--sampling grid_sample or gather.') from error
        inputs = [node.name for node in self.session.get_inputs()]
        outputs = [node.name for node in self.session.get_outputs()]
        if tuple(inputs) != INPUT_NAMES or tuple(outputs) != OUTPUT_NAMES:
            raise ValueError(
                f'{path!r} has inputs {inputs} and outputs {outputs}; '
                f'expected {list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}, as '
                'written by tools/deployment/export_onnx.py (a file of an '
                f'older version, without {IMAGE_SHAPES_NAME!r}, must be '
                'exported again).')

    @property
    def input_shape(self) -> Tuple:
        """(bs, 3, h, w): ints where fixed, names where dynamic."""
        return tuple(self.session.get_inputs()[0].shape)

    @property
    def metadata(self) -> Dict[str, object]:
        """The metadata written at export (e.g. ``classes``), decoded."""
        raw = self.session.get_modelmeta().custom_metadata_map
        return {key: json.loads(value) for key, value in raw.items()}

    def __call__(self,
                 images,
                 image_shapes=None) -> Tuple[np.ndarray, np.ndarray]:
        """Detections of a batch.

        Args:
            images (np.ndarray | Tensor): (bs, 3, h, w) float32, normalised,
                each image at the top left and padded with zeros; of the
                size the model was exported for unless it is dynamic.
            image_shapes (np.ndarray | Tensor, optional): (bs, 2), (height,
                width) of each image's unpadded part; the padding is masked
                as PyTorch masks it. Defaults to the full size (no
                padding).

        Returns:
            tuple[np.ndarray, np.ndarray]: ``dets`` (bs, k, 5) and
            ``labels`` (bs, k); see ``TensorDetector``.
        """
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._check_shape(images.shape)
        if image_shapes is None:
            image_shapes = full_image_shapes(torch.from_numpy(images))
        image_shapes = np.asarray(image_shapes, dtype=np.int64)
        self._check_image_shapes(images.shape, image_shapes)
        dets, labels = self.session.run(
            list(OUTPUT_NAMES), {
                INPUT_NAME: images,
                IMAGE_SHAPES_NAME: image_shapes
            })
        return dets, labels

    def _check_shape(self, shape: Tuple[int, ...]) -> None:
        expected = self.input_shape
        fits = len(shape) == 4 and all(
            not isinstance(want, int) or want == have
            for want, have in zip(expected, shape))
        if not fits:
            raise ValueError(
                f'{self.path!r} takes input of shape {expected} (names are '
                f'dynamic axes), got {tuple(shape)}; pad the image to '
                'the exported size (with its image_shapes) or export with '
                '--dynamic.')

    def _check_image_shapes(self, shape: Tuple[int, ...],
                            image_shapes: np.ndarray) -> None:
        """Sizes inside the padded input: the mask cannot be built from
        others."""
        batch_size, _, height, width = shape
        fits = image_shapes.shape == (batch_size, 2) and bool(
            (image_shapes >= 1).all() and
            (image_shapes[:, 0] <= height).all() and
            (image_shapes[:, 1] <= width).all())
        if not fits:
            raise ValueError(
                f'image_shapes must be ({batch_size}, 2), each image\'s '
                f'(height, width) within the {height}x{width} input; got '
                f'{image_shapes.tolist()}.')


def to_instances(dets: np.ndarray,
                 labels: np.ndarray,
                 img_meta: dict,
                 rescale: bool = True) -> InstanceData:
    """One image's ONNX outputs as ``predict``'s ``pred_instances``.

    Args:
        dets (np.ndarray): (k, 5) (x1, y1, x2, y2, score) in pixels of the
            network input.
        labels (np.ndarray): (k,) class indices.
        img_meta (dict): ``img_shape`` (the unpadded image in the input)
            and, with ``rescale``, ``scale_factor`` (w_scale, h_scale).
        rescale (bool): Whether to map boxes back to the original image,
            as ``predict(rescale=True)`` does. Defaults to True.

    Returns:
        InstanceData: ``bboxes`` (k, 4), ``scores`` (k,), ``labels`` (k,).
    """
    boxes = torch.from_numpy(np.array(dets[:, :4], dtype=np.float32))
    height, width = img_meta['img_shape'][:2]
    # Padding beyond img_shape is outside the image: clamp as predict does.
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    if rescale:
        if img_meta.get('scale_factor') is None:
            raise KeyError('rescale=True needs img_meta["scale_factor"] = '
                           f'(w_scale, h_scale); meta keys: '
                           f'{sorted(img_meta)}')
        boxes /= boxes.new_tensor(img_meta['scale_factor']).repeat((1, 2))
    instances = InstanceData()
    instances.bboxes = boxes
    instances.scores = torch.from_numpy(np.array(dets[:, 4], dtype=np.float32))
    instances.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
    return instances


class OnnxTestModel:
    """An ONNX model behind the config's data preprocessor.

    ``test_step`` takes what the config's test pipeline gives, as a
    detector's does, and returns data samples whose ``pred_instances`` are
    in the original image's pixels.

    Args:
        cfg (Config): The model's config (its ``model.data_preprocessor``).
        path (str): The ONNX model.
        num_threads (int, optional): ONNX Runtime threads.
    """

    def __init__(self,
                 cfg: Config,
                 path: str,
                 num_threads: Optional[int] = None) -> None:
        self.detector = OnnxRuntimeDetector(path, num_threads)
        self.data_preprocessor = build_data_preprocessor(cfg)
        metadata = self.detector.metadata
        palette = metadata.get('palette')
        self.dataset_meta = dict(
            classes=tuple(metadata.get('classes') or ()),
            palette=[tuple(color) for color in palette] if palette else None)

    def check_classes(self, classes: Optional[Sequence[str]],
                      source: str) -> None:
        """Raise a ValueError when ``classes`` are not the model's.

        Args:
            classes (Sequence[str], optional): Class names of the data the
                model is to be evaluated on.
            source (str): Where they come from, for the message.
        """
        model_classes = self.dataset_meta['classes']
        if not model_classes:
            # Files written without metadata: nothing to compare with.
            return
        if classes is None or tuple(classes) != model_classes:
            raise ValueError(
                f'{self.detector.path!r} was exported for '
                f'{len(model_classes)} classes {list(model_classes)} (its '
                f'metadata), but {source} has '
                f'{len(classes or ())} classes {list(classes or ())}; '
                'evaluate it with the config it was exported from, or '
                'export the checkpoint trained on these classes.')

    def test_step(self, data: dict) -> List[DetDataSample]:
        """Detections of a batch from the test pipeline.

        Args:
            data (dict): ``inputs`` (list of (3, h, w) uint8 tensors) and
                ``data_samples``, as the test dataloader gives.

        Returns:
            list[DetDataSample]: The samples with ``pred_instances``.
        """
        batch = self.data_preprocessor(data, False)
        samples = batch['data_samples']
        images = self.pad_to_model(batch['inputs'])
        image_shapes = [sample.metainfo['img_shape'][:2] for sample in samples]
        dets, labels = self.detector(images, image_shapes)
        for index, sample in enumerate(samples):
            sample.pred_instances = to_instances(dets[index], labels[index],
                                                 sample.metainfo)
        return samples

    def pad_to_model(self, images: torch.Tensor) -> torch.Tensor:
        """Pad a batch to the size of a model exported for a fixed size.

        The model masks the padding from ``image_shapes``, so the padded
        images give the detections PyTorch gives for the same batch.

        Args:
            images (Tensor): (bs, 3, h, w) from the data preprocessor.

        Returns:
            Tensor: (bs, 3, H, W), the exported size (or ``images`` itself
            for a dynamic model).
        """
        _, _, height, width = self.detector.input_shape
        if not isinstance(height, int) or not isinstance(width, int):
            return images
        pad_height = height - images.shape[2]
        pad_width = width - images.shape[3]
        if pad_height < 0 or pad_width < 0:
            raise ValueError(
                f'{self.detector.path!r} was exported for {height}x{width} '
                'images, but the test pipeline gives '
                f'{images.shape[2]}x{images.shape[3]}; export with --dynamic '
                'or with a larger --shape.')
        # The data preprocessor too pads with zeros at the bottom and right.
        return F.pad(images, (0, pad_width, 0, pad_height))
