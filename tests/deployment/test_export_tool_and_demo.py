"""``tools/deployment/export_onnx.py`` and ``demo/image_demo.py --onnx``
end to end, on a toy-sized two-stage checkpoint.

The tool exports at the config's test scale (128 x 128), and the demo
draws the same detections from the ONNX model as from the checkpoint, for
an image that the test pipeline resizes to that scale (so the boxes are
mapped back to the original image on both paths).
"""
import importlib.util
import os.path as osp
import re

import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config

from ddetr_plugin.deployment.requirements import require
from ddetr_plugin.ops import extension_loaded

pytestmark = pytest.mark.skipif(
    not extension_loaded(), reason='exporting needs the compiled op')


def load_script(repo, *parts):
    path = osp.join(repo, *parts)
    spec = importlib.util.spec_from_file_location('script_' + parts[-1][:-3],
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def checkpoint(toy, tmp_path_factory):
    """A config and a checkpoint of the toy-sized two-stage model."""
    folder = tmp_path_factory.mktemp('export_tool')
    cfg = Config.fromfile(toy.toy_config)
    cfg.model = toy.model_config('two_stage')
    config_path = str(folder / 'config.py')
    cfg.dump(config_path)
    model = toy.build_model('two_stage')
    classes = list(cfg.val_dataloader.dataset.metainfo.classes)
    palette = [[index * 20, 255 - index * 20, 128]
               for index in range(len(classes))]
    checkpoint_path = str(folder / 'model.pth')
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(dataset_meta=dict(classes=classes, palette=palette))),
        checkpoint_path)
    return folder, config_path, checkpoint_path


@pytest.fixture(scope='module')
def exported(toy, checkpoint):
    folder, config_path, checkpoint_path = checkpoint
    onnx_path = str(folder / 'model.onnx')
    tool = load_script(toy.repo, 'tools', 'deployment', 'export_onnx.py')
    assert tool.main([config_path, checkpoint_path, '--out', onnx_path]) == 0
    return onnx_path


def test_export_tool_writes_a_checked_model(exported, capsys):
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    detector = OnnxRuntimeDetector(exported)
    # The config's test scale, as no --shape was given.
    assert detector.input_shape == (1, 3, 128, 128)
    assert detector.metadata['classes'][0] == 'red square'
    assert detector.metadata['sampling'] == 'grid_sample'
    assert detector.metadata['input_shape'] == [1, 3, 128, 128]


def detections(output):
    """The (name, score, box) lines a demo run printed."""
    lines = re.findall(r'^  (.+?)\s+(\d\.\d{3})  \[(.+)\]$', output,
                       re.MULTILINE)
    return [(name, float(score), [float(value) for value in box.split(',')])
            for name, score, box in lines]


def test_demo_draws_the_same_detections_from_onnx(toy, checkpoint, exported,
                                                  capsys):
    folder, config_path, checkpoint_path = checkpoint
    # Resized to 128 x 128 by the test pipeline: boxes are scaled back.
    image = np.random.default_rng(0).integers(
        0, 256, (256, 256, 3), dtype=np.uint8)
    image[40:120, 60:180] = (0, 0, 255)
    image_path = str(folder / 'image.png')
    mmcv.imwrite(image, image_path)
    demo = load_script(toy.repo, 'demo', 'image_demo.py')
    runs = {}
    for name, model_args in (('pytorch', ['--weights', checkpoint_path]),
                             ('onnx', ['--onnx', exported])):
        out_dir = str(folder / f'vis_{name}')
        assert demo.main([
            image_path, config_path, *model_args, '--out-dir', out_dir,
            '--score-thr', '0.3', '--device', 'cpu'
        ]) == 0
        runs[name] = detections(capsys.readouterr().out)
        drawn = mmcv.imread(osp.join(out_dir, 'image.png'))
        assert drawn.shape == image.shape
    assert len(runs['pytorch']) > 0
    assert len(runs['onnx']) == len(runs['pytorch'])
    for (name, score, box), (expected_name, expected_score,
                             expected_box) in zip(runs['onnx'],
                                                  runs['pytorch']):
        assert name == expected_name
        assert abs(score - expected_score) <= 1e-3
        # Printed to 0.1 px, in the original image's pixels.
        np.testing.assert_allclose(box, expected_box, atol=0.11)
        assert max(box) <= 256


def test_export_tool_refuses_an_opset_too_low_for_grid_sample(toy):
    tool = load_script(toy.repo, 'tools', 'deployment', 'export_onnx.py')
    with pytest.raises(ValueError, match='opset >= 16.*gather'):
        tool.main(
            ['config.py', 'model.pth', '--out', 'model.onnx', '--opset', '15'])


def test_missing_package_says_how_to_install():
    with pytest.raises(ImportError, match='requirements/deploy.txt'):
        require('onnx_package_that_does_not_exist', 'This test')
