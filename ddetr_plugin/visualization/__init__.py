"""Seeing where Deformable DETR looks.

Capturing the sampling points and weights of the deformable attention
(:mod:`.attention_capture`), mapping them to pixels of the original image
(:mod:`.sampling_points`), running a detector on one image with the
captures (:mod:`.detector_probe`). The pictures themselves
(:mod:`.drawing`) need matplotlib and are imported on demand.
"""
from .attention_capture import AttentionCapture, AttentionRecord
from .detector_probe import (Detection, Probe, inference_pipeline, probe_image,
                             resolve_layer, select_detections)
from .sampling_points import (QueryPoints, detection_queries,
                              encoder_query_index, pixels_per_unit,
                              query_points)

__all__ = [
    'AttentionCapture', 'AttentionRecord', 'Detection', 'Probe', 'QueryPoints',
    'detection_queries', 'encoder_query_index', 'inference_pipeline',
    'pixels_per_unit', 'probe_image', 'query_points', 'resolve_layer',
    'select_detections'
]
