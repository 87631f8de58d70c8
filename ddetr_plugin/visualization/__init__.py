"""Seeing where Deformable DETR and Conditional DETR look.

Deformable DETR: capturing the sampling points and weights of the
deformable attention (:mod:`.attention_capture`), mapping them to pixels of
the original image (:mod:`.sampling_points`), running a detector on one
image with the captures (:mod:`.detector_probe`).

Conditional DETR: capturing the spatial, content and combined attention
maps of a cross-attention (:mod:`.conditional_attention_maps`), placing
the feature map's cells in the original image (:mod:`.feature_grid`),
running a detector on one image with the capture
(:mod:`.conditional_probe`).

The pictures themselves (:mod:`.drawing`, :mod:`.attention_map_drawing`)
need matplotlib and are imported on demand.
"""
from .attention_capture import AttentionCapture, AttentionRecord
from .conditional_attention_maps import (ConditionalAttentionCapture,
                                         ConditionalAttentionRecord,
                                         attention_maps)
from .conditional_probe import (ConditionalProbe, probe_conditional_image,
                                query_maps)
from .detector_probe import (Detection, Probe, inference_pipeline, probe_image,
                             resolve_layer, select_detections)
from .feature_grid import (FeatureGrid, cell_centres, feature_grid, peaks,
                           upsample)
from .sampling_points import (QueryPoints, detection_queries,
                              encoder_query_index, pixels_per_unit,
                              query_points)

__all__ = [
    'AttentionCapture', 'AttentionRecord', 'ConditionalAttentionCapture',
    'ConditionalAttentionRecord', 'ConditionalProbe', 'FeatureGrid',
    'attention_maps', 'cell_centres', 'feature_grid', 'peaks',
    'probe_conditional_image', 'query_maps', 'upsample', 'Detection', 'Probe',
    'QueryPoints', 'detection_queries', 'encoder_query_index',
    'inference_pipeline', 'pixels_per_unit', 'probe_image', 'query_points',
    'resolve_layer', 'select_detections'
]
