"""``tools/deployment/export_onnx.py``, ``tools/deployment/test_onnx.py``
and ``demo/image_demo.py --onnx`` end to end, on a trained toy-sized
two-stage checkpoint.

The model is trained by ``tools/train.py`` for 120 iterations on 48
generated toy images of 160 x 160: enough to find shapes, so that the
evaluation compares real detections. The pipelines resize the images
without keeping their ratio to 80 x 112 (h x w; factors 0.5 in y and 0.7 in
x), and the tool exports for a fixed 96 x 128: every image is padded into
the model's input, the model masks the padding from the image size given
with it, and the boxes are mapped back with different x and y factors.
"""
import json
import os
import os.path as osp
import re
import subprocess
import sys

import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config

from ddetr_plugin.deployment import config_inputs, example_images
from ddetr_plugin.deployment.requirements import require
from testkit import load_script

IMAGE_SIZE = 160
# The pipelines' resize: (w, h), not keeping the ratio, and the export's
# fixed (h, w), larger on both sides.
RESIZED = (112, 80)
EXPORT_SHAPE = (96, 128)


def training_config(toy, data_root: str) -> Config:
    """The toy config with the toy-sized two-stage model, on ``data_root``,
    for a 120-iteration schedule."""
    cfg = Config.fromfile(toy.toy_config)
    cfg.model = toy.model_config('two_stage')
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        cfg[loader].update(
            batch_size=4, num_workers=0, persistent_workers=False)
        cfg[loader].dataset.data_root = data_root
    cfg.val_evaluator.ann_file = osp.join(data_root,
                                          'annotations/instances_val.json')
    cfg.test_evaluator = cfg.val_evaluator
    cfg.train_cfg = dict(
        type='EpochBasedTrainLoop', max_epochs=10, val_interval=10)
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, end=10)
    ]
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=4)
    cfg.default_hooks.logger.interval = 12
    for loader in ('train_dataloader', 'test_dataloader'):
        for transform in cfg[loader].dataset.pipeline:
            if transform.type == 'Resize':
                transform.update(scale=RESIZED, keep_ratio=False)
    cfg.val_dataloader = cfg.test_dataloader
    return cfg


@pytest.fixture(scope='module')
def checkpoint(toy, compiled_op, tmp_path_factory):
    """The config, the trained checkpoint and the data of the model."""
    folder = tmp_path_factory.mktemp('export_tool')
    data_root = str(folder / 'data')
    generator = load_script('tools/misc/make_toy_dataset.py')
    generator.generate(
        data_root, seed=5, num_train=48, num_val=16, image_size=IMAGE_SIZE)
    config_path = str(folder / 'config.py')
    training_config(toy, data_root).dump(config_path)
    work_dir = str(folder / 'work')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env['PYTHONPATH'] = os.pathsep.join(
        [toy.repo] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    run = subprocess.run([
        sys.executable,
        osp.join(toy.repo, 'tools', 'train.py'), config_path, '--work-dir',
        work_dir
    ],
                         env=env,
                         capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    with open(osp.join(work_dir, 'last_checkpoint')) as file:
        checkpoint_path = file.read().strip()
    return folder, config_path, checkpoint_path, data_root


@pytest.fixture(scope='module')
def exported(toy, checkpoint):
    folder, config_path, checkpoint_path, _ = checkpoint
    onnx_path = str(folder / 'model.onnx')
    tool = load_script('tools/deployment/export_onnx.py')
    assert tool.main([
        config_path, checkpoint_path, '--out', onnx_path, '--shape',
        *map(str, EXPORT_SHAPE)
    ]) == 0
    return onnx_path


def test_export_tool_writes_a_checked_model(exported):
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    detector = OnnxRuntimeDetector(exported)
    assert detector.input_shape == (1, 3, *EXPORT_SHAPE)
    assert tuple(detector.session.get_inputs()[1].shape) == (1, 2)
    assert detector.metadata['classes'][0] == 'red square'
    assert detector.metadata['sampling'] == 'grid_sample'
    assert detector.metadata['input_shape'] == [1, 3, *EXPORT_SHAPE]
    # A model of fixed size refuses another size, saying what to do.
    with pytest.raises(ValueError, match='export with --dynamic'):
        detector(example_images(96, 96))
    # ... and image sizes that do not fit its input.
    with pytest.raises(ValueError, match='within the 96x128 input'):
        detector(example_images(*EXPORT_SHAPE), [[97, 128]])


def test_export_size_defaults_to_the_test_scale(toy):
    cfg = Config.fromfile(toy.toy_config)
    # keep_ratio fits a landscape image in (short side, long side).
    assert config_inputs.test_input_shape(cfg) == (128, 128)
    cfg = training_config(toy, 'data')
    assert config_inputs.test_input_shape(cfg) == (RESIZED[1], RESIZED[0])


def test_onnx_runtime_gives_the_pytorch_map(toy, checkpoint, exported):
    folder, config_path, checkpoint_path, _ = checkpoint
    out_json = str(folder / 'metrics.json')
    tool = load_script('tools/deployment/test_onnx.py')
    assert tool.main([
        config_path, exported, '--weights', checkpoint_path, '--threads', '1',
        '--out-json', out_json
    ]) == 0
    with open(out_json) as file:
        metrics = json.load(file)
    pytorch, onnx = metrics['pytorch'], metrics['onnx']
    # The trained model finds shapes, so the comparison is of detections
    # that count, not of an empty result.
    assert pytorch['coco/bbox_mAP_50'] >= 0.05
    assert sorted(onnx) == sorted(pytorch)
    for key, value in pytorch.items():
        assert round(onnx[key], 3) == round(value, 3), key


def test_onnx_tool_refuses_other_classes_before_running(
        toy, checkpoint, exported, monkeypatch):
    folder, config_path, _, _ = checkpoint
    cfg = Config.fromfile(config_path)
    classes = list(cfg.test_dataloader.dataset.metainfo.classes)
    other_classes = classes[::-1]
    cfg.test_dataloader.dataset.metainfo.classes = other_classes
    other_config = str(folder / 'other_classes.py')
    cfg.dump(other_config)
    tool = load_script('tools/deployment/test_onnx.py')

    def evaluate(*args):
        raise AssertionError('the split ran before the classes were checked')

    monkeypatch.setattr(tool, 'evaluate', evaluate)
    with pytest.raises(ValueError) as error:
        tool.main([other_config, exported])
    message = str(error.value)
    assert 'exported for 10 classes' in message
    assert str(classes) in message and str(other_classes) in message
    assert other_config in message


def detections(output):
    """The (name, score, box) lines a demo run printed."""
    lines = re.findall(r'^  (.+?)\s+(\d\.\d{3})  \[(.+)\]$', output,
                       re.MULTILINE)
    return [(name, float(score), [float(value) for value in box.split(',')])
            for name, score, box in lines]


def padded_pytorch_detections(toy, config_path, checkpoint_path, onnx_path,
                              image_path, score_thr):
    """(name, score, box) of PyTorch's ``predict`` on the image as the ONNX
    demo feeds it: through the test pipeline and padded to the model's
    input, boxes in the original image."""
    from mmdet.apis import init_detector

    from ddetr_plugin.deployment.onnx_runtime import OnnxTestModel
    from ddetr_plugin.visualization import inference_pipeline
    cfg = Config.fromfile(config_path)
    model = init_detector(cfg, checkpoint_path, device='cpu').eval()
    onnx_model = OnnxTestModel(cfg, onnx_path, num_threads=1)
    data = inference_pipeline(cfg.test_dataloader.dataset.pipeline)(
        dict(img_path=image_path, img_id=0))
    tool = load_script('tools/deployment/test_onnx.py')
    with torch.no_grad():
        sample, = tool.pytorch_test_step(model, onnx_model)(
            dict(inputs=[data['inputs']], data_samples=[data['data_samples']]))
    instances = sample.pred_instances
    keep = instances.scores >= score_thr
    classes = cfg.test_dataloader.dataset.metainfo.classes
    return [
        (classes[label], score, box)
        for box, score, label in zip(instances.bboxes[keep].tolist(
        ), instances.scores[keep].tolist(), instances.labels[keep].tolist())
    ]


def test_demo_draws_the_same_detections_from_onnx(toy, checkpoint, exported,
                                                  capsys):
    folder, config_path, checkpoint_path, data_root = checkpoint
    # A val image of 160 x 160, resized to 80 x 112 by the test pipeline
    # and padded to the model's 96 x 128: the boxes are scaled back by
    # different x and y factors.
    image_path = osp.join(data_root, 'val', '000000.png')
    image = mmcv.imread(image_path)
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    demo = load_script('demo/image_demo.py')
    runs = {}
    for name, model_args in (('pytorch', ['--weights', checkpoint_path]),
                             ('onnx', ['--onnx', exported])):
        out_dir = str(folder / f'vis_{name}')
        assert demo.main([
            image_path, config_path, *model_args, '--out-dir', out_dir,
            '--score-thr', '0.1', '--device', 'cpu', '--min-size', '1'
        ]) == 0
        runs[name] = detections(capsys.readouterr().out)
        # Drawn at the image's own size (--min-size 1: no enlarging).
        drawn = mmcv.imread(osp.join(out_dir, osp.basename(image_path)))
        assert drawn.shape == image.shape
    assert len(runs['pytorch']) > 0
    # The ONNX demo draws what PyTorch predicts for the same padded input
    # (the PyTorch demo's input is not padded, so its figures differ a
    # little, as in a batch of images of different sizes).
    expected = padded_pytorch_detections(toy, config_path, checkpoint_path,
                                         exported, image_path, 0.1)
    assert len(expected) > 0
    assert len(runs['onnx']) == len(expected)
    for (name, score, box), (expected_name, expected_score,
                             expected_box) in zip(runs['onnx'], expected):
        assert name == expected_name
        assert abs(score - expected_score) <= 1e-3
        # Printed to 0.1 px, in the original image's pixels.
        np.testing.assert_allclose(box, expected_box, atol=0.11)
        assert max(box) <= IMAGE_SIZE


def test_demo_names_classes_of_a_file_without_metadata(toy, checkpoint,
                                                       exported, capsys):
    # An ONNX file of other code: the model without the metadata that
    # export_onnx.py writes (mmdet's visualizer used to fail on it).
    onnx = require('onnx', 'deploy')
    folder, config_path, _, data_root = checkpoint
    model = onnx.load(exported)
    del model.metadata_props[:]
    bare_path = str(folder / 'bare.onnx')
    onnx.save(model, bare_path)
    image_path = osp.join(data_root, 'val', '000000.png')
    demo = load_script('demo/image_demo.py')
    runs = {}
    for name, path in (('exported', exported), ('bare', bare_path)):
        assert demo.main([
            image_path, config_path, '--onnx', path, '--out-dir',
            str(folder / f'vis_{name}'), '--score-thr', '0.1'
        ]) == 0
        runs[name] = capsys.readouterr().out
    assert 'holds no class names' in runs['bare']
    assert 'holds no class names' not in runs['exported']
    # The config's names, so the same listing as the file with metadata.
    assert detections(runs['bare']) == detections(runs['exported'])
    assert len(detections(runs['bare'])) > 0
    assert osp.isfile(str(folder / 'vis_bare' / '000000.png'))


def test_export_tool_writes_tensorrt_plugin_nodes(toy, checkpoint, capsys):
    from ddetr_plugin.deployment.onnx_ms_deform_attn import \
        TENSORRT_PLUGIN_NAME
    onnx = require('onnx', 'This test')
    folder, config_path, checkpoint_path, _ = checkpoint
    path = str(folder / 'trt_plugin.onnx')
    tool = load_script('tools/deployment/export_onnx.py')
    assert tool.main([
        config_path, checkpoint_path, '--out', path, '--sampling', 'trt_plugin'
    ]) == 0
    assert f'trtexec --onnx={path}' in capsys.readouterr().out
    node_types = [node.op_type for node in onnx.load(path).graph.node]
    # One node per deformable attention: 1 encoder and 2 decoder layers;
    # no sampling in standard operators is left.
    assert node_types.count(TENSORRT_PLUGIN_NAME) == 3
    assert 'GridSample' not in node_types


@pytest.mark.parametrize('sampling', ['grid_sample', 'gather'])
def test_export_tool_refuses_an_opset_below_17_for_every_sampling(
        toy, sampling):
    tool = load_script('tools/deployment/export_onnx.py')
    with pytest.raises(ValueError) as error:
        tool.main([
            'config.py', 'model.pth', '--out', 'model.onnx', '--opset', '15',
            '--sampling', sampling
        ])
    message = str(error.value)
    assert 'too low for every --sampling' in message
    assert 'LayerNormalization' in message and '--opset 17' in message
    # Switching modes would not help: no such advice.
    assert 'use --sampling' not in message


def test_export_tool_refuses_a_dynamic_size_over_the_limit_at_once(toy):
    tool = load_script('tools/deployment/export_onnx.py')
    # Refused before the checkpoint is read, which does not exist.
    with pytest.raises(ValueError, match=r'at most 4096 px.*--shape H W'):
        tool.main([
            toy.toy_config, 'missing.pth', '--out', 'model.onnx', '--dynamic',
            '--shape', '96', '4097'
        ])


def test_export_tool_refuses_a_dynamic_size_under_the_models(
        checkpoint, tmp_path):
    # Deformable DETR's smallest level has stride 64: 64 px is too small,
    # which only the built model tells.
    _, config_path, checkpoint_path, _ = checkpoint
    tool = load_script('tools/deployment/export_onnx.py')
    with pytest.raises(
            ValueError, match=r'65 to 4096 px.*stride 64.*--shape H W'):
        tool.main([
            config_path, checkpoint_path, '--out',
            str(tmp_path / 'model.onnx'), '--dynamic', '--shape', '64', '96'
        ])
    assert not (tmp_path / 'model.onnx').exists()


def test_missing_package_says_how_to_install():
    with pytest.raises(ImportError, match='requirements/deploy.txt'):
        require('onnx_package_that_does_not_exist', 'This test')
