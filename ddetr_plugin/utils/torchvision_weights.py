"""``torchvision://NAME`` checkpoints without torchvision.

The COCO configs (the plugin's and mmdet's) initialise their ResNet from
``init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')``.
MMEngine resolves that prefix by importing ``torchvision.models`` only to
read the weights' download addresses, so it fails where torchvision is not
installed or cannot be imported (its registry wheels are CUDA builds whose
ops need ``libtorch_cuda.so``; with the CPU torch ``import torchvision``
raises ``RuntimeError``).

:func:`register_torchvision_scheme` replaces MMEngine's loader for
``torchvision://``: with an importable torchvision it uses MMEngine's own
table (which adds the names of newer torchvision releases); without it, the
table MMEngine ships in ``mmengine/hub/torchvision_0.12.json``, which holds
the published addresses of torchvision's ImageNet weights (``resnet50``,
``resnet101``, ``resnext101_32x8d`` ...). The download goes through
MMEngine's HTTP loader (torch's hub cache, one download per machine).
A download that fails raises :class:`PretrainedDownloadError` saying which
``init_cfg`` could not be loaded and how to point it at a local file or
train from scratch.
"""
import os.path as osp
from typing import Dict, Optional

import mmengine
from mmengine.runner import checkpoint as mmengine_checkpoint

PREFIX = 'torchvision://'
# The table of torchvision 0.12's weight URLs that MMEngine ships.
URL_TABLE = osp.join('hub', 'torchvision_0.12.json')


class PretrainedDownloadError(RuntimeError):
    """Pretrained weights named by ``init_cfg`` could not be downloaded."""


def _torchvision_importable() -> bool:
    try:
        import torchvision.models  # noqa: F401
    except Exception:  # ImportError, or RuntimeError of a CUDA build
        return False
    return True


def torchvision_model_urls() -> Dict[str, str]:
    """Names accepted after ``torchvision://`` and their download URLs.

    Returns:
        dict[str, str]: e.g. ``{'resnet50': 'https://download.pytorch.org/
        models/resnet50-0676ba61.pth', ...}``; MMEngine's full table when
        torchvision imports, the table MMEngine ships otherwise.
    """
    if _torchvision_importable():
        return mmengine_checkpoint.get_torchvision_models()
    return mmengine.load(osp.join(mmengine.__path__[0], URL_TABLE))


def _download_failed(filename: str, url: str, error: Exception) -> str:
    name = filename[len(PREFIX):]
    return (
        f'could not download the pretrained weights of '
        f'init_cfg=dict(type=\'Pretrained\', checkpoint={filename!r}) from '
        f'{url} ({type(error).__name__}: {error}). Without network, '
        f'download {url} elsewhere and point the config at the file, e.g. '
        f'model.backbone.init_cfg=dict(type=\'Pretrained\', '
        f'checkpoint=\'/path/{name}.pth\') (or put it in torch\'s hub cache, '
        f'{osp.join("$TORCH_HOME", "hub", "checkpoints")}); or train from '
        'scratch with model.backbone.init_cfg=None')


def load_from_torchvision_urls(filename: str,
                               map_location: Optional[str] = None) -> dict:
    """MMEngine checkpoint loader of ``torchvision://NAME``.

    Args:
        filename (str): ``'torchvision://NAME'``.
        map_location (str, optional): As for :func:`torch.load`.

    Returns:
        dict: The downloaded (or cached) checkpoint.

    Raises:
        KeyError: ``NAME`` is not in the table, with the names that are.
        PretrainedDownloadError: The download failed.
    """
    name = filename[len(PREFIX):]
    urls = torchvision_model_urls()
    if name not in urls:
        raise KeyError(f'{filename!r}: {name!r} is not a torchvision model '
                       f'with published weights; known names: '
                       f'{sorted(urls)}')
    url = urls[name]
    try:
        return mmengine_checkpoint.load_from_http(
            url, map_location=map_location)
    except OSError as error:  # URLError, socket errors, a full disk
        raise PretrainedDownloadError(_download_failed(filename, url,
                                                       error)) from None


def register_torchvision_scheme() -> None:
    """Make MMEngine load ``torchvision://`` through
    :func:`load_from_torchvision_urls`. Safe to call again."""
    mmengine_checkpoint.CheckpointLoader.register_scheme(
        PREFIX, load_from_torchvision_urls, force=True)
