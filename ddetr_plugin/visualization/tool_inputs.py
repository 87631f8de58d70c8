"""What the visualisation tools share: their common command-line
arguments, the image, the checked model, the class names and the summary
of a detection."""
import argparse
import os.path as osp
from typing import Callable, List, Optional, Sequence, Tuple

import mmcv
import numpy as np
import torch
from mmdet.apis import init_detector
from mmengine.config import Config, DictAction
from torch import nn

from ddetr_plugin.engine import checkpoint_check, launch
from .detector_probe import Detection


def read_image(path: str) -> np.ndarray:
    """The image as (h, w, 3) RGB, or an error naming the file."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'image {path!r} does not exist')
    try:
        image = mmcv.imread(path)
    except Exception as error:  # the decoders raise various types
        raise ValueError(f'could not read image {path!r}: {error}') from error
    if image is None:
        raise ValueError(
            f'could not read image {path!r}: OpenCV cannot decode it; give '
            'a PNG, JPEG, BMP or TIFF file')
    return mmcv.bgr2rgb(image)


def load_checked_model(
        config: str, checkpoint: str, device: str,
        cfg_options: Optional[dict]) -> Tuple[Config, nn.Module]:
    """The config's model with the checkpoint's weights, checked strictly
    (as ``tools/test.py`` checks them), in eval mode."""
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist')
    cfg = launch.load_config(config, cfg_options)
    model = init_detector(cfg, checkpoint, device=device)
    checkpoint_check.check_checkpoint_matches(model, checkpoint, config)
    return cfg, model.eval()


def parse_tool_arguments(
    description: str,
    argv: Optional[List[str]],
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None
) -> argparse.Namespace:
    """Arguments of a tool drawing one image's detections.

    ``IMAGE CONFIG CHECKPOINT --out-dir DIR [--score-thr] [--layer]
    [--max-dets] [--device] [--cfg-options]``, and the tool's own.

    Args:
        description (str): The tool's description for ``--help``.
        argv (list[str], optional): The arguments; None reads sys.argv.
        add_arguments (callable, optional): Adds the tool's own arguments
            to the parser.

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('image', help='the image file')
    parser.add_argument('config', help='config file of the model')
    parser.add_argument('checkpoint', help='checkpoint of the model')
    parser.add_argument(
        '--out-dir', required=True, help='folder for the pictures')
    parser.add_argument(
        '--score-thr',
        type=float,
        default=0.3,
        help='draw detections scoring at least this (default 0.3)')
    parser.add_argument(
        '--layer',
        type=int,
        default=-1,
        help='decoder layer whose cross-attention is drawn; negative counts '
        'from the last (default -1)')
    parser.add_argument(
        '--max-dets',
        type=int,
        default=5,
        help='draw at most this many detections, best first (default 5)')
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument(
        '--device',
        default='cuda:0' if torch.cuda.is_available() else 'cpu',
        help='device to run on')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as key=value pairs')
    args = parser.parse_args(argv)
    if args.max_dets < 0:
        parser.error(f'--max-dets must be 0 or more, got {args.max_dets}')
    return args


def class_names(model: nn.Module, num_classes: int) -> List[str]:
    """The names of the model's classes: its ``dataset_meta``'s, and the
    class index for the classes it does not name."""
    classes = list((getattr(model, 'dataset_meta', None)
                    or {}).get('classes', ()))
    return classes + [str(label) for label in range(len(classes), num_classes)]


def detection_summary(detection: Detection, names: Sequence[str]) -> dict:
    """The JSON-ready fields of a detection."""
    return dict(
        rank=detection.rank,
        query=detection.query,
        label=detection.label,
        class_name=names[detection.label],
        score=detection.score,
        box=detection.box.tolist())
