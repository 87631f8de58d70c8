"""Run a Deformable DETR on one image and keep where its queries looked.

:func:`probe_image` runs the model's ordinary ``test_step`` once, with
read-only hooks: an :class:`AttentionCapture` on the chosen decoder layer's
cross-attention (and, if asked, an encoder layer's self-attention), and two
more for what the pixel mapping and the query of each detection need: the
valid ratios the decoder receives and the class logits the head returns.
:func:`select_detections` ranks the (query, class) pairs as the head does
and checks the result against the model's own detections.
"""
import inspect
from typing import List, NamedTuple, Optional

import torch
from mmengine.dataset import Compose
from mmengine.registry import DefaultScope
from torch import Tensor, nn

from ddetr_plugin.registry import SCOPE
from .attention_capture import AttentionCapture, AttentionRecord
from .sampling_points import detection_queries


class Probe(NamedTuple):
    """One image's detections and the attention behind them.

    Attributes:
        result (DetDataSample): The model's prediction, with its meta
            (``img_shape``, ``scale_factor``, ``ori_shape``...).
        decoder (AttentionRecord): The chosen decoder layer's
            cross-attention; batch of one.
        encoder (AttentionRecord, optional): The chosen encoder layer's
            self-attention, or None.
        valid_ratios (Tensor): (num_levels, 2), (w, h) unpadded fraction of
            each level's map, as the decoder received them.
        cls_scores (Tensor): (num_queries, num_classes) logits of the last
            decoder layer.
        decoder_layer (int): The decoder layer, counted from 0.
        encoder_layer (int, optional): The encoder layer, counted from 0.
    """
    result: object
    decoder: AttentionRecord
    encoder: Optional[AttentionRecord]
    valid_ratios: Tensor
    cls_scores: Tensor
    decoder_layer: int
    encoder_layer: Optional[int]


class Detection(NamedTuple):
    """A kept detection and the decoder query that made it.

    Attributes:
        rank (int): Position among the model's detections, best first.
        query (int): Index of the decoder query.
        label (int): Class index.
        score (float): Score.
        box (Tensor): (4,) (x1, y1, x2, y2) in original-image pixels, the
            model's own box.
    """
    rank: int
    query: int
    label: int
    score: float
    box: Tensor


def resolve_layer(index: int, num_layers: int, what: str) -> int:
    """A layer index counted from 0, accepting negative ones from the end.

    Raises:
        ValueError: When ``index`` names no layer.
    """
    if not -num_layers <= index < num_layers:
        raise ValueError(
            f'{what} layer {index} is out of range: the model has '
            f'{num_layers} {what} layers (0 to {num_layers - 1}, or '
            f'{-num_layers} to -1 from the last)')
    return index % num_layers


def inference_pipeline(test_pipeline: List[dict]) -> Compose:
    """The config's test pipeline without annotation loading: an image
    given on the command line has none."""
    transforms = [
        transform for transform in test_pipeline
        if not str(transform['type']).endswith('LoadAnnotations')
    ]
    with DefaultScope.overwrite_default_scope(SCOPE):
        return Compose(transforms)


def probe_image(model: nn.Module,
                image_path: str,
                pipeline: Compose,
                decoder_layer: int = -1,
                encoder_layer: Optional[int] = None) -> Probe:
    """Detect objects in one image and capture the attention.

    Args:
        model (nn.Module): A plugin ``DeformableDETR``, in eval mode.
        image_path (str): The image file.
        pipeline (Compose): From :func:`inference_pipeline`.
        decoder_layer (int): Decoder layer whose cross-attention is kept;
            negative counts from the last. Defaults to -1.
        encoder_layer (int, optional): Encoder layer whose self-attention
            is kept too; None keeps none.

    Returns:
        Probe: The prediction and the captures.
    """
    transformer = model.transformer
    decoder_layer = resolve_layer(decoder_layer,
                                  transformer.decoder.num_layers, 'decoder')
    attentions = dict(
        decoder=transformer.decoder.layers[decoder_layer].cross_attn)
    if encoder_layer is not None:
        encoder_layer = resolve_layer(encoder_layer,
                                      transformer.encoder.num_layers,
                                      'encoder')
        attentions['encoder'] = transformer.encoder.layers[
            encoder_layer].self_attn

    seen = {}

    def keep_valid_ratios(module, args, kwargs):
        seen['valid_ratios'] = inspect.signature(module.forward).bind(
            *args, **kwargs).arguments['valid_ratios']

    def keep_cls_scores(module, args, output):
        seen['cls_scores'] = output[0][-1]

    data = pipeline(dict(img_path=image_path, img_id=0))
    data = dict(inputs=[data['inputs']], data_samples=[data['data_samples']])
    handles = [
        transformer.decoder.register_forward_pre_hook(
            keep_valid_ratios, with_kwargs=True),
        model.bbox_head.register_forward_hook(keep_cls_scores)
    ]
    try:
        with AttentionCapture(attentions) as capture, torch.no_grad():
            result = model.test_step(data)[0]
    finally:
        for handle in handles:
            handle.remove()
    return Probe(
        result=result,
        decoder=capture.records['decoder'][-1],
        encoder=capture.records['encoder'][-1]
        if encoder_layer is not None else None,
        valid_ratios=seen['valid_ratios'][0],
        cls_scores=seen['cls_scores'][0],
        decoder_layer=decoder_layer,
        encoder_layer=encoder_layer)


def select_detections(probe: Probe, max_per_img: int, score_thr: float,
                      max_dets: int) -> List[Detection]:
    """The best detections scoring at least ``score_thr``, with queries.

    Args:
        probe (Probe): From :func:`probe_image`.
        max_per_img (int): The head's ``test_cfg.max_per_img``.
        score_thr (float): Lowest score kept.
        max_dets (int): Most detections kept.

    Returns:
        list[Detection]: Best first.

    Raises:
        RuntimeError: When ranking the head's logits does not reproduce the
            model's detections, i.e. the head ranks them another way.
    """
    scores, labels, queries = detection_queries(probe.cls_scores, max_per_img)
    predicted = probe.result.pred_instances
    if len(predicted) != len(scores) or not torch.equal(
            predicted.labels.cpu(), labels.cpu()) or not torch.allclose(
                predicted.scores.cpu(), scores.cpu()):
        raise RuntimeError(
            'ranking the last decoder layer\'s logits as the head does '
            'did not reproduce the model\'s detections, so the query of '
            'each detection is unknown; the head\'s predict must rank '
            '(query, class) pairs by sigmoid score, top max_per_img')
    detections = []
    for rank in range(len(scores)):
        score = float(predicted.scores[rank])
        if score < score_thr or len(detections) >= max_dets:
            break
        detections.append(
            Detection(
                rank=rank,
                query=int(queries[rank]),
                label=int(predicted.labels[rank]),
                score=score,
                box=predicted.bboxes[rank].detach().cpu().to(torch.float64)))
    return detections
