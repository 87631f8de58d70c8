"""Draw where Deformable DETR looks for its detections.

    python tools/analysis_tools/vis_sampling_points.py IMAGE CONFIG CHECKPOINT
        --out-dir DIR [--score-thr 0.3] [--layer -1] [--max-dets 5]
        [--encoder-pixel X Y] [--encoder-layer -1] [--encoder-level 0]
        [--device cpu] [--cfg-options KEY=VALUE ...]

The model runs once on IMAGE. For each of the best ``--max-dets``
detections scoring at least ``--score-thr``, ``DIR/<image>_det<k>.png``
shows the detected box, the reference (a point, or a box with refinement
and two-stage) and the cross-attention sampling points of decoder layer
``--layer`` for every head and level: one marker shape per level, size and
colour by attention weight. ``DIR/<image>_overview.png`` shows all of them,
one colour per detection. ``--encoder-pixel X Y`` adds
``DIR/<image>_encoder.png``: the points of the encoder query (of layer
``--encoder-layer``, on level ``--encoder-level``) at that pixel, on every
level. Coordinates are pixels of the original image, as the detections';
points outside the image are drawn on its border and counted.
``DIR/<image>_sampling_points.json`` holds every drawn number.
"""
import argparse
import json
import os
import os.path as osp
import sys
from typing import List, Optional

# The tool runs from a checkout without installing the package.
sys.path.insert(0,
                osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

import ddetr_plugin  # noqa: F401
from ddetr_plugin.models.layers.transformer import DeformableDetrTransformer
from ddetr_plugin.visualization import (QueryPoints, encoder_query_index,
                                        inference_pipeline, probe_image,
                                        query_points, resolve_layer,
                                        select_detections)
from ddetr_plugin.visualization.tool_inputs import (class_names,
                                                    detection_summary,
                                                    load_checked_model,
                                                    parse_tool_arguments,
                                                    read_image)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        '--encoder-pixel',
        type=float,
        nargs=2,
        metavar=('X', 'Y'),
        help='also draw the encoder query at this pixel of the image')
    parser.add_argument(
        '--encoder-layer',
        type=int,
        default=-1,
        help='encoder layer of --encoder-pixel (default -1, the last)')
    parser.add_argument(
        '--encoder-level',
        type=int,
        default=0,
        help='feature level of the query of --encoder-pixel (default 0, the '
        'finest)')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_tool_arguments(
        'Draw the sampling points and attention weights behind the '
        'detections of one image', argv, add_encoder_arguments)


def load_model(config: str, checkpoint: str, device: str,
               cfg_options: Optional[dict]):
    """The config's model with the checkpoint's weights, checked strictly."""
    cfg, model = load_checked_model(config, checkpoint, device, cfg_options)
    if not isinstance(
            getattr(model, 'transformer', None), DeformableDetrTransformer):
        raise TypeError(
            f'config {config!r} builds a {type(model).__name__} without the '
            'plugin\'s DeformableDetrTransformer; this tool draws the '
            'plugin\'s Deformable DETR (model.type=\'DeformableDETR\' in '
            'the ddetr_plugin scope)')
    return cfg, model


def _point_summary(query: QueryPoints) -> dict:
    return dict(
        reference=query.reference.tolist(),
        points=query.points.tolist(),
        weights=query.weights.tolist(),
        spatial_shapes=query.spatial_shapes.tolist())


def visualize(model,
              test_pipeline: List[dict],
              image_path: str,
              out_dir: str,
              score_thr: float = 0.3,
              layer: int = -1,
              max_dets: int = 5,
              encoder_pixel: Optional[List[float]] = None,
              encoder_layer: int = -1,
              encoder_level: int = 0) -> dict:
    """Run the model on one image and write the pictures and the JSON.

    Args:
        model (nn.Module): The plugin's ``DeformableDETR`` in eval mode.
        test_pipeline (list[dict]): The config's test pipeline.
        image_path (str): The image.
        out_dir (str): Folder for the pictures.
        score_thr, layer, max_dets, encoder_pixel, encoder_layer,
        encoder_level: See the command-line flags.

    Returns:
        dict: What ``<image>_sampling_points.json`` holds.
    """
    # Imported here: matplotlib is needed only once there is something to
    # draw.
    from ddetr_plugin.visualization import drawing

    image = read_image(image_path)
    transformer = model.transformer
    # Bad flags fail before the model runs.
    resolve_layer(layer, transformer.decoder.num_layers, 'decoder')
    if encoder_pixel is not None:
        resolve_layer(encoder_layer, transformer.encoder.num_layers, 'encoder')
        height, width = image.shape[:2]
        x, y = encoder_pixel
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f'--encoder-pixel ({x:g}, {y:g}) is outside image '
                f'{image_path!r}, which is {width} x {height} pixels (x in '
                f'[0, {width}), y in [0, {height}))')
    probe = probe_image(
        model,
        image_path,
        inference_pipeline(test_pipeline),
        decoder_layer=layer,
        encoder_layer=encoder_layer if encoder_pixel is not None else None)
    meta = probe.result.metainfo
    max_per_img = model.bbox_head.test_cfg.get('max_per_img',
                                               probe.cls_scores.shape[0])
    detections = select_detections(probe, max_per_img, score_thr, max_dets)
    names = class_names(model, probe.cls_scores.shape[1])

    os.makedirs(out_dir, exist_ok=True)
    stem = osp.splitext(osp.basename(image_path))[0]
    summary = dict(
        image=image_path,
        ori_shape=list(image.shape[:2]),
        decoder_layer=probe.decoder_layer,
        detections=[])
    queries = []
    for index, detection in enumerate(detections):
        query = query_points(probe.decoder, 0, detection.query,
                             probe.valid_ratios, meta)
        queries.append(query)
        picture = osp.join(out_dir, f'{stem}_det{index}.png')
        outside = drawing.draw_detection(image, detection, query,
                                         names[detection.label],
                                         probe.decoder_layer, picture)
        summary['detections'].append(
            dict(
                detection_summary(detection, names),
                outside=outside,
                picture=picture,
                **_point_summary(query)))
    summary['overview'] = osp.join(out_dir, f'{stem}_overview.png')
    drawing.draw_overview(image, detections, queries, names,
                          probe.decoder_layer, summary['overview'])
    if encoder_pixel is not None:
        index = encoder_query_index(encoder_pixel, encoder_level,
                                    probe.encoder, 0, probe.valid_ratios, meta)
        query = query_points(probe.encoder, 0, index, probe.valid_ratios, meta)
        picture = osp.join(out_dir, f'{stem}_encoder.png')
        level = encoder_level % probe.encoder.spatial_shapes.shape[0]
        outside = drawing.draw_encoder_query(image, query, encoder_pixel,
                                             level, probe.encoder_layer,
                                             picture)
        summary['encoder'] = dict(
            pixel=list(encoder_pixel),
            layer=probe.encoder_layer,
            level=level,
            query=index,
            outside=outside,
            picture=picture,
            **_point_summary(query))
    with open(osp.join(out_dir, f'{stem}_sampling_points.json'), 'w') as file:
        json.dump(summary, file)
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # An unreadable image fails before the model is loaded.
    read_image(args.image)
    cfg, model = load_model(args.config, args.checkpoint, args.device,
                            args.cfg_options)
    summary = visualize(
        model,
        cfg.test_dataloader.dataset.pipeline,
        args.image,
        args.out_dir,
        score_thr=args.score_thr,
        layer=args.layer,
        max_dets=args.max_dets,
        encoder_pixel=args.encoder_pixel,
        encoder_layer=args.encoder_layer,
        encoder_level=args.encoder_level)
    print(f'{args.image}: {len(summary["detections"])} detections with '
          f'score >= {args.score_thr}, decoder layer '
          f'{summary["decoder_layer"]}')
    for detection in summary['detections']:
        print(f'  {detection["class_name"]:<20} {detection["score"]:.3f}  '
              f'query {detection["query"]:<4} -> {detection["picture"]}' +
              (f' ({detection["outside"]} points outside the image)'
               if detection['outside'] else ''))
    print(f'  overview -> {summary["overview"]}')
    if 'encoder' in summary:
        encoder = summary['encoder']
        print(f'  encoder query {encoder["query"]} (layer {encoder["layer"]},'
              f' level {encoder["level"]}) -> {encoder["picture"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
