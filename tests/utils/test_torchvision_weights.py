"""``torchvision://NAME`` checkpoints resolve without torchvision.

torchvision cannot be imported here (its wheels are CUDA builds), as on
the machines of the issue; the tests make that explicit by hiding it, so
that they mean the same on a machine that has it. No test uses the
network: downloads are replaced by stand-ins that fail or return weights.
"""
import glob
import os.path as osp
import re
import sys
import types
import urllib.error

import pytest
import torch
from mmengine.config import Config
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

import ddetr_plugin  # noqa: F401
from ddetr_plugin.utils import PretrainedDownloadError, torchvision_model_urls
from testkit import REPO

# torchvision's published weights: download.pytorch.org/models/NAME-HASH.pth
PUBLISHED_URL = 'https://download.pytorch.org/models/{name}-[0-9a-f]{{8}}.pth'


@pytest.fixture
def without_torchvision(monkeypatch):
    """``import torchvision`` fails, as with its CUDA wheel here."""
    monkeypatch.setitem(sys.modules, 'torchvision', None)
    monkeypatch.setitem(sys.modules, 'torchvision.models', None)


def _download(monkeypatch, result):
    """Replace MMEngine's downloader; returns the list of requested URLs.

    ``result`` is returned, or raised if it is an exception.
    """
    requested = []

    def load_url(url, **kwargs):
        requested.append(url)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(mmengine_checkpoint, 'load_url', load_url)
    return requested


def _shipped_torchvision_names():
    """The torchvision:// names of the plugin's configs' backbones."""
    names = set()
    for path in glob.glob(
            osp.join(REPO, 'configs', '**', '*.py'), recursive=True):
        model = Config.fromfile(path).get('model')
        if model is None:  # configs/_base_/
            continue
        checkpoint = (model.backbone.get('init_cfg')
                      or {}).get('checkpoint', '')
        if checkpoint.startswith('torchvision://'):
            names.add(checkpoint[len('torchvision://'):])
    return names


def test_shipped_configs_names_map_to_published_urls(without_torchvision):
    names = _shipped_torchvision_names()
    assert {'resnet50', 'resnet101'} <= names
    urls = torchvision_model_urls()
    for name in names:
        assert re.fullmatch(PUBLISHED_URL.format(name=name), urls[name])


def test_loads_without_torchvision(without_torchvision, monkeypatch):
    weights = {'conv1.weight': torch.ones(1)}
    requested = _download(monkeypatch, weights)
    loaded = CheckpointLoader.load_checkpoint('torchvision://resnet50')
    assert loaded is weights
    assert requested == [torchvision_model_urls()['resnet50']]


def test_offline_gives_one_message_saying_what_to_do(without_torchvision,
                                                     monkeypatch):
    _download(
        monkeypatch,
        urllib.error.URLError('[Errno -3] Temporary failure in name '
                              'resolution'))
    with pytest.raises(PretrainedDownloadError) as caught:
        CheckpointLoader.load_checkpoint('torchvision://resnet101')
    message = str(caught.value)
    assert ("init_cfg=dict(type='Pretrained', checkpoint="
            "'torchvision://resnet101')") in message
    assert torchvision_model_urls()['resnet101'] in message
    assert "checkpoint='/path/resnet101.pth'" in message
    assert 'init_cfg=None' in message
    # One message, not a chain of tracebacks.
    assert caught.value.__suppress_context__


def test_unknown_name_lists_the_known_ones(without_torchvision):
    with pytest.raises(KeyError, match="resnet05.*'resnet50'"):
        CheckpointLoader.load_checkpoint('torchvision://resnet05')


def test_importable_torchvision_gives_mmengine_table(monkeypatch):
    # A stand-in: a newer torchvision's names come from MMEngine's table.
    fake = types.ModuleType('torchvision')
    fake.models = types.ModuleType('torchvision.models')
    monkeypatch.setitem(sys.modules, 'torchvision', fake)
    monkeypatch.setitem(sys.modules, 'torchvision.models', fake.models)
    newer = 'https://download.pytorch.org/models/resnet50-11ad3fa6.pth'
    monkeypatch.setattr(mmengine_checkpoint, 'get_torchvision_models',
                        lambda: {'resnet50.imagenet1k_v2': newer})
    requested = _download(monkeypatch, {})
    CheckpointLoader.load_checkpoint('torchvision://resnet50.imagenet1k_v2')
    assert requested == [newer]


def test_local_file_as_the_message_says_loads(tmp_path):
    from mmdet.models.backbones import ResNet
    saved = ResNet(depth=18, base_channels=8)
    path = str(tmp_path / 'resnet18.pth')
    torch.save(saved.state_dict(), path)
    model = ResNet(
        depth=18,
        base_channels=8,
        init_cfg=dict(type='Pretrained', checkpoint=path))
    model.init_weights()
    for key, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
