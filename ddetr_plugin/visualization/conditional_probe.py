"""Run a Conditional DETR on one image and keep its attention maps.

:func:`probe_conditional_image` runs the model's ordinary ``test_step``
once with read-only hooks: a :class:`ConditionalAttentionCapture` on the
chosen decoder layer's cross-attention, and three more for what the
pictures need: the feature map's size (on the transformer's input), the
reference points (the decoder's output) and the class logits (the
head's output). The detections and their queries then come from
:func:`~ddetr_plugin.visualization.select_detections`, as for Deformable
DETR.
"""
import inspect
from typing import NamedTuple, Tuple

import torch
from mmengine.dataset import Compose
from torch import Tensor, nn

from .conditional_attention_maps import (MAP_KINDS,
                                         ConditionalAttentionCapture,
                                         ConditionalAttentionRecord)
from .detector_probe import resolve_layer
from .feature_grid import FeatureGrid, feature_grid


class ConditionalProbe(NamedTuple):
    """One image's detections and the attention maps behind them.

    It has the ``result`` and ``cls_scores`` that
    :func:`~ddetr_plugin.visualization.select_detections` reads.

    Attributes:
        result (DetDataSample): The model's prediction with its meta.
        maps (ConditionalAttentionRecord): The chosen decoder layer's
            cross-attention; batch of one.
        references (Tensor): (num_queries, 2) normalised (x, y) reference
            points, relative to the image's unpadded input as the boxes.
        cls_scores (Tensor): (num_queries, num_classes) logits of the last
            decoder layer.
        grid (FeatureGrid): The memory's cells in the original image.
        decoder_layer (int): The decoder layer, counted from 0.
    """
    result: object
    maps: ConditionalAttentionRecord
    references: Tensor
    cls_scores: Tensor
    grid: FeatureGrid
    decoder_layer: int


def probe_conditional_image(model: nn.Module,
                            image_path: str,
                            pipeline: Compose,
                            decoder_layer: int = -1) -> ConditionalProbe:
    """Detect objects in one image and capture one layer's attention maps.

    Args:
        model (nn.Module): A plugin ``ConditionalDETR`` in eval mode.
        image_path (str): The image file.
        pipeline (Compose): From
            :func:`~ddetr_plugin.visualization.inference_pipeline`.
        decoder_layer (int): Decoder layer whose cross-attention is kept;
            negative counts from the last. Defaults to -1.

    Returns:
        ConditionalProbe: The prediction and the maps.
    """
    transformer = model.transformer
    decoder_layer = resolve_layer(decoder_layer,
                                  transformer.decoder.num_layers, 'decoder')
    attention = transformer.decoder.layers[decoder_layer].cross_attn
    seen = {}

    def keep_feature_shape(module, args, kwargs):
        feature = inspect.signature(module.forward).bind(
            *args, **kwargs).arguments['feature']
        seen['feature_shape'] = tuple(feature.shape[-2:])

    def keep_references(module, args, output):
        seen['references'] = output[1]

    def keep_cls_scores(module, args, output):
        seen['cls_scores'] = output[0][-1]

    data = pipeline(dict(img_path=image_path, img_id=0))
    data = dict(inputs=[data['inputs']], data_samples=[data['data_samples']])
    handles = [
        transformer.register_forward_pre_hook(
            keep_feature_shape, with_kwargs=True),
        transformer.decoder.register_forward_hook(keep_references),
        model.bbox_head.register_forward_hook(keep_cls_scores)
    ]
    try:
        with ConditionalAttentionCapture(dict(decoder=attention)) as capture, \
                torch.no_grad():
            result = model.test_step(data)[0]
    finally:
        for handle in handles:
            handle.remove()
    return ConditionalProbe(
        result=result,
        maps=capture.records['decoder'][-1],
        references=seen['references'][0],
        cls_scores=seen['cls_scores'][0],
        grid=feature_grid(seen['feature_shape'], result.metainfo),
        decoder_layer=decoder_layer)


def query_maps(probe: ConditionalProbe,
               query: int) -> Tuple[Tensor, Tensor, Tensor]:
    """One query's three maps on the feature grid.

    Args:
        probe (ConditionalProbe): From :func:`probe_conditional_image`.
        query (int): The query.

    Returns:
        tuple[Tensor]: ``spatial``, ``content`` and ``combined``, each
        (num_heads, h, w) float64 on the CPU.
    """
    height, width = probe.grid.feature_shape
    return tuple(
        getattr(probe.maps, kind)[0, :, query].cpu().to(torch.float64).view(
            -1, height, width) for kind in MAP_KINDS)
