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
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.structures import InstanceData

from .config_inputs import build_data_preprocessor
from .onnx_ms_deform_attn import TENSORRT_PLUGIN_NAME
from .requirements import require
from .torch_export import INPUT_NAME, OUTPUT_NAMES


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
        if inputs != [INPUT_NAME] or tuple(outputs) != OUTPUT_NAMES:
            raise ValueError(
                f'{path!r} has inputs {inputs} and outputs {outputs}; '
                f'expected [{INPUT_NAME!r}] and {list(OUTPUT_NAMES)}, as '
                'written by tools/deployment/export_onnx.py.')

    @property
    def input_shape(self) -> Tuple:
        """(bs, 3, h, w): ints where fixed, names where dynamic."""
        return tuple(self.session.get_inputs()[0].shape)

    @property
    def metadata(self) -> Dict[str, object]:
        """The metadata written at export (e.g. ``classes``), decoded."""
        raw = self.session.get_modelmeta().custom_metadata_map
        return {key: json.loads(value) for key, value in raw.items()}

    def __call__(self, images) -> Tuple[np.ndarray, np.ndarray]:
        """Detections of a batch.

        Args:
            images (np.ndarray | Tensor): (bs, 3, h, w) float32, normalised
                and unpadded, of the size the model was exported for unless
                it is dynamic.

        Returns:
            tuple[np.ndarray, np.ndarray]: ``dets`` (bs, k, 5) and
            ``labels`` (bs, k); see ``TensorDetector``.
        """
        if isinstance(images, torch.Tensor):
            images = images.detach().cpu().numpy()
        images = np.ascontiguousarray(images, dtype=np.float32)
        self._check_shape(images.shape)
        dets, labels = self.session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: images})
        return dets, labels

    def _check_shape(self, shape: Tuple[int, ...]) -> None:
        expected = self.input_shape
        fits = len(shape) == 4 and all(
            not isinstance(want, int) or want == have
            for want, have in zip(expected, shape))
        if not fits:
            raise ValueError(
                f'{self.path!r} takes input of shape {expected} (names are '
                f'dynamic axes), got {tuple(shape)}; resize the image to '
                'the exported size or export with --dynamic.')


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
        dets, labels = self.detector(self._fit(batch['inputs']))
        for index, sample in enumerate(samples):
            sample.pred_instances = to_instances(dets[index], labels[index],
                                                 sample.metainfo)
        return samples

    def _fit(self, images: torch.Tensor) -> torch.Tensor:
        """Pad to the size of a model exported for a fixed size."""
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
