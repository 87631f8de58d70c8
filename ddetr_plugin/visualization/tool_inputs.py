"""The inputs of the visualisation tools: an image and a checked model."""
import os.path as osp
from typing import Optional, Tuple

import mmcv
import numpy as np
from mmdet.apis import init_detector
from mmengine.config import Config
from torch import nn

from ddetr_plugin.engine import checkpoint_check, launch


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
