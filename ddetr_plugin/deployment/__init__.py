"""Deployment: the detector (Deformable or Conditional DETR) exported with
``torch.export`` and to ONNX.

- :class:`TensorDetector`: a padded image batch and its image sizes in,
  ``dets``/``labels`` out;
- :func:`export_detector`: ``torch.export`` with dynamic batch and size,
  the plugin's op (Deformable DETR) kept as one node;
- ``onnx_export.export_onnx``: the ONNX file, the op as standard operators
  (``onnx_ms_deform_attn``), dense attention as the exporter writes it;
- ``onnx_runtime.OnnxRuntimeDetector``: the file in ONNX Runtime.

The ONNX modules import ``onnx``, ``onnxscript`` and ``onnxruntime`` only
when used (``requirements/deploy.txt``); importing this package needs
none of them.
"""
from .detection_wrapper import (TensorDetector, decode_detections,
                                full_image_shapes)
from .torch_export import (example_images, export_detector, load_program,
                           save_program)

__all__ = [
    'TensorDetector', 'decode_detections', 'example_images', 'export_detector',
    'full_image_shapes', 'load_program', 'save_program'
]
