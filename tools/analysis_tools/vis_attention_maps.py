"""Draw where Conditional DETR's cross-attention looks for its detections.

    python tools/analysis_tools/vis_attention_maps.py IMAGE CONFIG CHECKPOINT
        --out-dir DIR [--layer -1] [--score-thr 0.3] [--max-dets 5]
        [--device cpu] [--cfg-options KEY=VALUE ...]

The model runs once on IMAGE. For each of the best ``--max-dets``
detections scoring at least ``--score-thr``, ``DIR/<image>_det<k>.png``
shows the detected box and its query's reference point, and, for every
head of decoder layer ``--layer``'s cross-attention, the three maps of
Figures 1 and 4 of the Conditional DETR paper: the softmax over the
feature map's cells of the spatial match, of the content match, and of
their sum (the weights the layer applied). The maps are resampled at every
pixel of the original image (padding and test-time resize undone, as for
the detections). ``DIR/<image>_attention_maps.json`` holds the maps on the
feature grid and each one's peak in original-image pixels.
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

import torch

import ddetr_plugin  # noqa: F401
from ddetr_plugin.models.layers.conditional_transformer import \
    ConditionalDetrTransformer
from ddetr_plugin.models.layers.transformer import DeformableDetrTransformer
from ddetr_plugin.visualization import (inference_pipeline, pixels_per_unit,
                                        resolve_layer, select_detections)
from ddetr_plugin.visualization.conditional_attention_maps import MAP_KINDS
from ddetr_plugin.visualization.conditional_probe import (
    probe_conditional_image, query_maps)
from ddetr_plugin.visualization.feature_grid import peaks, upsample
from ddetr_plugin.visualization.tool_inputs import (class_names,
                                                    detection_summary,
                                                    load_checked_model,
                                                    parse_tool_arguments,
                                                    read_image)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return parse_tool_arguments(
        'Draw the spatial, content and combined cross-attention maps of '
        'Conditional DETR behind the detections of one image', argv)


def load_model(config: str, checkpoint: str, device: str,
               cfg_options: Optional[dict]):
    """The config's Conditional DETR with the checkpoint's weights."""
    cfg, model = load_checked_model(config, checkpoint, device, cfg_options)
    transformer = getattr(model, 'transformer', None)
    if isinstance(transformer, DeformableDetrTransformer):
        raise TypeError(
            f'config {config!r} builds the plugin\'s Deformable DETR, whose '
            'attention samples points instead of weighting every cell; '
            'draw it with tools/analysis_tools/vis_sampling_points.py')
    if not isinstance(transformer, ConditionalDetrTransformer):
        raise TypeError(
            f'config {config!r} builds a {type(model).__name__} without the '
            'plugin\'s ConditionalDetrTransformer; this tool draws the '
            'plugin\'s Conditional DETR (model.type=\'ConditionalDETR\' in '
            'the ddetr_plugin scope)')
    return cfg, model


def visualize(model,
              test_pipeline: List[dict],
              image_path: str,
              out_dir: str,
              layer: int = -1,
              score_thr: float = 0.3,
              max_dets: int = 5) -> dict:
    """Run the model on one image and write the pictures and the JSON.

    Args:
        model (nn.Module): The plugin's ``ConditionalDETR`` in eval mode.
        test_pipeline (list[dict]): The config's test pipeline.
        image_path (str): The image.
        out_dir (str): Folder for the pictures.
        layer, score_thr, max_dets: See the command-line flags.

    Returns:
        dict: What ``<image>_attention_maps.json`` holds.
    """
    # Imported here: matplotlib is needed only once there is something to
    # draw.
    from ddetr_plugin.visualization.attention_map_drawing import \
        draw_attention_maps

    image = read_image(image_path)
    # A bad layer fails before the model runs.
    resolve_layer(layer, model.transformer.decoder.num_layers, 'decoder')
    probe = probe_conditional_image(model, image_path,
                                    inference_pipeline(test_pipeline), layer)
    max_per_img = model.bbox_head.test_cfg.get('max_per_img',
                                               probe.cls_scores.shape[0])
    detections = select_detections(probe, max_per_img, score_thr, max_dets)
    names = class_names(model, probe.cls_scores.shape[1])
    # Reference points are relative to the unpadded input, as the boxes:
    # the head's scaling gives original-image pixels.
    pixels = pixels_per_unit(probe.result.metainfo)

    os.makedirs(out_dir, exist_ok=True)
    stem = osp.splitext(osp.basename(image_path))[0]
    summary = dict(
        image=image_path,
        ori_shape=list(image.shape[:2]),
        decoder_layer=probe.decoder_layer,
        feature_shape=list(probe.grid.feature_shape),
        cell_size=probe.grid.cell_size.tolist(),
        detections=[])
    for index, detection in enumerate(detections):
        maps = dict(zip(MAP_KINDS, query_maps(probe, detection.query)))
        reference = probe.references[detection.query].cpu().to(
            torch.float64) * pixels
        peak_locations, peak_weights = {}, {}
        for kind, kind_maps in maps.items():
            peak_locations[kind], peak_weights[kind] = peaks(
                kind_maps.flatten(1), probe.grid)
        picture = osp.join(out_dir, f'{stem}_det{index}.png')
        image_maps = {
            kind: upsample(kind_maps, probe.grid).numpy()
            for kind, kind_maps in maps.items()
        }
        peak_pixels = {
            kind: locations.numpy()
            for kind, locations in peak_locations.items()
        }
        draw_attention_maps(image, detection, reference.numpy(), image_maps,
                            peak_pixels, names[detection.label],
                            probe.decoder_layer, detection.query, picture)
        summary['detections'].append(
            dict(
                detection_summary(detection, names),
                reference=reference.tolist(),
                picture=picture,
                maps={kind: maps[kind].tolist()
                      for kind in MAP_KINDS},
                peaks={
                    kind: peak_locations[kind].tolist()
                    for kind in MAP_KINDS
                },
                peak_weights={
                    kind: peak_weights[kind].tolist()
                    for kind in MAP_KINDS
                }))
    with open(osp.join(out_dir, f'{stem}_attention_maps.json'), 'w') as file:
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
        layer=args.layer,
        score_thr=args.score_thr,
        max_dets=args.max_dets)
    print(f'{args.image}: {len(summary["detections"])} detections with '
          f'score >= {args.score_thr}, decoder layer '
          f'{summary["decoder_layer"]}, feature map '
          f'{summary["feature_shape"][0]}x{summary["feature_shape"][1]}')
    for detection in summary['detections']:
        print(f'  {detection["class_name"]:<20} {detection["score"]:.3f}  '
              f'query {detection["query"]:<4} -> {detection["picture"]}')
    stem = osp.splitext(osp.basename(args.image))[0]
    print(f'  numbers -> {osp.join(args.out_dir, stem)}_attention_maps.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())
