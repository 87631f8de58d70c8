"""Detect objects in images and draw the boxes.

    python demo/image_demo.py IMAGE CONFIG --weights CHECKPOINT
        [--out-dir DIR] [--score-thr 0.3] [--min-size 512] [--device cpu]
    python demo/image_demo.py IMAGE CONFIG --onnx MODEL.onnx
        [--out-dir DIR] [--score-thr 0.3] [--threads N]

IMAGE is an image file or a folder of images. For each image, the
detections scoring at least ``--score-thr`` are drawn by MMDetection's
``DetLocalVisualizer`` into ``DIR/<image name>`` (PNG, JPEG...: the input's
format), and listed on standard output. Images whose longer side is under
``--min-size`` pixels are drawn scaled up to it, as ``tools/test.py
--show-dir`` draws them, so that the labels stay readable. A checkpoint
whose weights do not fit the config's model is refused, naming the
mismatched keys.

With ``--onnx``, a model written by ``tools/deployment/export_onnx.py``
runs in ONNX Runtime instead of PyTorch: the image goes through the same
test pipeline and data preprocessor of CONFIG, and the boxes are clamped
and mapped back to the original image as ``predict`` does, so both paths
draw the same detections. A model exported for a fixed size takes images
up to that size: they are padded with zeros to it, and the model masks the
padding from the image's size (its second input), as PyTorch masks the
padding of a batch. An ONNX file without class names in its metadata
(written by other code) is labelled with the names of CONFIG's test set.
"""
import argparse
import os
import os.path as osp
import sys
from typing import List, Tuple

# The demo runs from a checkout without installing the package.
sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import mmcv
import torch
from mmdet.apis import inference_detector, init_detector
from mmdet.structures import DetDataSample
from mmengine.config import DictAction

# Importing the plugin registers its classes.
import ddetr_plugin  # noqa: F401
from ddetr_plugin.engine import checkpoint_check, launch
from ddetr_plugin.engine.visualization_hook import (DEFAULT_MIN_SIZE,
                                                    scale_for_drawing)
from ddetr_plugin.registry import VISUALIZERS
from ddetr_plugin.visualization import inference_pipeline

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description='Detect objects in images and draw them')
    parser.add_argument('image', help='an image file or a folder of images')
    parser.add_argument('config', help='config file of the model')
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument('--weights', help='checkpoint of the model')
    model.add_argument(
        '--onnx',
        help='an ONNX model of tools/deployment/export_onnx.py, run in '
        'ONNX Runtime instead of PyTorch')
    parser.add_argument(
        '--out-dir', default='outputs', help='folder for the drawn images')
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help='draw detections scoring at least this')
    parser.add_argument(
        '--min-size',
        type=int,
        default=DEFAULT_MIN_SIZE,
        help='draw images whose longer side is shorter scaled up to this '
        'many pixels, so that labels stay readable (as tools/test.py '
        '--show-dir does)')
    parser.add_argument(
        '--device',
        default='cuda:0' if torch.cuda.is_available() else 'cpu',
        help='device to run on')
    parser.add_argument(
        '--threads',
        type=int,
        default=None,
        help='ONNX Runtime threads (default: all cores)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as key=value pairs')
    return parser.parse_args(argv)


def list_images(path: str) -> List[str]:
    """The image files that ``path`` names: itself, or a folder's images."""
    if osp.isfile(path):
        return [path]
    if osp.isdir(path):
        images = sorted(
            osp.join(path, name) for name in os.listdir(path)
            if name.lower().endswith(IMAGE_SUFFIXES))
        if not images:
            raise FileNotFoundError(f'folder {path!r} holds no image files '
                                    f'({", ".join(IMAGE_SUFFIXES)})')
        return images
    raise FileNotFoundError(f'image {path!r} does not exist')


def config_classes(cfg) -> Tuple[str, ...]:
    """Class names of the config's test set, read from the config (its
    ``metainfo``, else its data set class's defaults), one per class of
    the model's head: unnamed classes are named by their index."""
    from mmdet.registry import DATASETS
    dataset = cfg.test_dataloader.dataset
    classes = (dataset.get('metainfo') or {}).get('classes')
    if not classes:
        dataset_class = DATASETS.get(dataset.get('type', ''))
        classes = (getattr(dataset_class, 'METAINFO', None)
                   or {}).get('classes', ())
    classes = tuple(classes)
    num_classes = cfg.model.get('bbox_head', {}).get('num_classes')
    if num_classes is not None:
        classes = classes[:num_classes] + tuple(
            str(index) for index in range(len(classes), num_classes))
    return classes


def main(argv=None) -> int:
    args = parse_args(argv)
    images = list_images(args.image)
    cfg = launch.load_config(args.config, args.cfg_options)
    pipeline = inference_pipeline(cfg.test_dataloader.dataset.pipeline)
    if args.onnx:
        # Imported here: ONNX Runtime is needed only on this path.
        from ddetr_plugin.deployment.onnx_runtime import OnnxTestModel
        onnx_model = OnnxTestModel(cfg, args.onnx, args.threads)
        dataset_meta = onnx_model.dataset_meta
        if not dataset_meta['classes']:
            dataset_meta = dict(dataset_meta, classes=config_classes(cfg))
            print(f'{args.onnx} holds no class names in its metadata (files '
                  'of tools/deployment/export_onnx.py do); labelling with '
                  f'the {len(dataset_meta["classes"])} class names of the '
                  f'test set of {args.config}.')

        def predictor(path: str) -> DetDataSample:
            # What inference_detector does around a PyTorch model.
            data = pipeline(dict(img_path=path, img_id=0))
            return onnx_model.test_step(
                dict(
                    inputs=[data['inputs']],
                    data_samples=[data['data_samples']]))[0]
    else:
        if not osp.isfile(args.weights):
            raise FileNotFoundError(
                f'--weights {args.weights!r} does not exist')
        model = init_detector(cfg, args.weights, device=args.device)
        checkpoint_check.check_checkpoint_matches(model, args.weights)
        dataset_meta = model.dataset_meta

        def predictor(path: str) -> DetDataSample:
            return inference_detector(model, path, test_pipeline=pipeline)

    visualizer = VISUALIZERS.build(
        dict(type='DetLocalVisualizer', name='image_demo'))
    visualizer.dataset_meta = dataset_meta
    os.makedirs(args.out_dir, exist_ok=True)
    for path in images:
        image = mmcv.imread(path)
        if image is None:
            raise OSError(f'could not read image {path!r}')
        result = predictor(path)
        out_file = osp.join(args.out_dir, osp.basename(path))
        # The listed boxes stay in the image's pixels; only the drawing is
        # scaled.
        drawn_image, drawn_result = scale_for_drawing(
            mmcv.bgr2rgb(image), result, args.min_size)
        visualizer.add_datasample(
            osp.basename(path),
            drawn_image,
            data_sample=drawn_result,
            draw_gt=False,
            pred_score_thr=args.score_thr,
            out_file=out_file)
        instances = result.pred_instances
        keep = instances.scores >= args.score_thr
        print(f'{path}: {int(keep.sum())} detections with score >= '
              f'{args.score_thr}, drawn into {out_file}')
        classes = dataset_meta.get('classes', ())
        for box, score, label in zip(instances.bboxes[keep].tolist(),
                                     instances.scores[keep].tolist(),
                                     instances.labels[keep].tolist()):
            name = classes[label] if label < len(classes) else str(label)
            print(f'  {name:<20} {score:.3f}  [' +
                  ', '.join(f'{value:.1f}' for value in box) + ']')
    return 0


if __name__ == '__main__':
    sys.exit(main())
