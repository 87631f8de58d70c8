"""What the exported model's input looks like, read from a config.

The ONNX model takes the image after the config's test pipeline and data
preprocessor (resized, normalised, padded). These helpers give the default
export size and the data preprocessor on its own, so ONNX Runtime is fed
exactly what PyTorch would be.
"""
import math
from typing import Tuple

from mmengine.config import Config
from mmengine.registry import DefaultScope
from torch import nn

from ddetr_plugin.registry import MODELS, SCOPE


def _test_pipeline(cfg: Config) -> list:
    try:
        return list(cfg.test_dataloader.dataset.pipeline)
    except AttributeError:
        raise KeyError('the config has no test_dataloader.dataset.pipeline '
                       'to read the test scale from; pass --shape H W.')


def test_input_shape(cfg: Config) -> Tuple[int, int]:
    """(h, w) of the largest image the config's test pipeline produces.

    The first ``Resize`` of the test pipeline gives ``scale=(w, h)``; with
    ``keep_ratio`` an image fits in the long side max(w, h) and the short
    side min(w, h), so a landscape image is at most (min, max). The size is
    rounded up to the data preprocessor's ``pad_size_divisor``.

    Args:
        cfg (Config): A detector config.

    Returns:
        tuple[int, int]: (height, width).
    """
    resizes = [
        transform for transform in _test_pipeline(cfg)
        if str(transform.get('type')).endswith('Resize')
        and transform.get('scale') is not None
    ]
    if not resizes:
        raise KeyError('the config\'s test pipeline has no Resize with a '
                       'scale to take the export size from; pass --shape H '
                       'W.')
    scale = resizes[0]['scale']
    if isinstance(scale, int):
        scale = (scale, scale)
    if resizes[0].get('keep_ratio', False):
        height, width = min(scale), max(scale)
    else:
        width, height = scale
    divisor = cfg.model.get('data_preprocessor', {}).get(
        'pad_size_divisor', 1) or 1
    return (int(math.ceil(height / divisor) * divisor),
            int(math.ceil(width / divisor) * divisor))


def build_data_preprocessor(cfg: Config) -> nn.Module:
    """The config's data preprocessor alone (normalisation, padding)."""
    preprocessor = cfg.model.get('data_preprocessor')
    if preprocessor is None:
        raise KeyError('the config has no model.data_preprocessor; the ONNX '
                       'model needs its normalisation (mean, std) to be fed '
                       'the same input as PyTorch.')
    with DefaultScope.overwrite_default_scope(SCOPE):
        return MODELS.build(preprocessor)
