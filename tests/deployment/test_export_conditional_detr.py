"""Conditional DETR through ``torch.export``, ONNX Runtime,
``tools/deployment/export_onnx.py`` and ``demo/image_demo.py``.

A toy-sized model (the toy config shrunk to 32 channels, one encoder and
two decoder layers, 20 queries; its classifier redrawn as the Deformable
toy models' are, so that scores spread) is exported once with dynamic
batch, height and width; the program and its ONNX file are shared by the
tests. Its attention is dense (``F.scaled_dot_product_attention``), so
nothing here needs the plugin's compiled op. The export tool and the demo
run on a checkpoint of the same weights.
"""
import os.path as osp

import mmcv
import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.registry import DefaultScope

from ddetr_plugin.deployment import (example_images, export_detector,
                                     torch_export)
from ddetr_plugin.registry import MODELS
from testkit import load_script

EMBED_DIMS = 32
# The fixed size the export tool writes, and the images run through it:
# one filling it, one padded.
TOOL_SHAPE = (128, 160)
TOOL_IMAGES = ((128, 160), (100, 72))


def toy_config_path(toy) -> str:
    return osp.join(toy.repo, 'configs', 'toy', 'conditional-detr_toy.py')


def tiny_config(toy) -> Config:
    """The Conditional DETR toy config with the model shrunk for tests."""
    cfg = Config.fromfile(toy_config_path(toy))
    model = cfg.model
    model.num_queries = 20
    model.backbone.update(base_channels=8, init_cfg=None)
    # ResNet-18 of width 8: C5 has 64 channels.
    model.neck.update(in_channels=[64], out_channels=EMBED_DIMS)
    attention = dict(embed_dims=EMBED_DIMS, num_heads=2)
    ffn = dict(embed_dims=EMBED_DIMS, feedforward_channels=2 * EMBED_DIMS)
    encoder, decoder = model.transformer.encoder, model.transformer.decoder
    encoder.num_layers = 1
    encoder.layer_cfg.self_attn_cfg.update(attention)
    encoder.layer_cfg.ffn_cfg.update(ffn)
    # Two layers: a head reading the wrong layer would show.
    decoder.num_layers = 2
    decoder.layer_cfg.self_attn_cfg.update(attention)
    decoder.layer_cfg.cross_attn_cfg.update(attention)
    decoder.layer_cfg.ffn_cfg.update(ffn)
    model.transformer.positional_encoding.num_feats = EMBED_DIMS // 2
    model.bbox_head.embed_dims = EMBED_DIMS
    model.test_cfg = dict(max_per_img=toy.max_per_img)
    return cfg


def build_tiny_model(toy) -> torch.nn.Module:
    """The seeded tiny model in eval mode, its scores spread (see
    ``test_scores_are_spread``).

    Untrained, the queries' hidden states barely differ (content queries
    start at zero and the noise images' features are alike), so many
    (query, class) scores nearly tie. The query embeddings and the
    cross-attention's projections are scaled up, so that the queries'
    reference points spread and each attends to its own part of the map;
    the classifier is redrawn with logits of about unit spread.
    """
    with DefaultScope.overwrite_default_scope('ddetr_plugin'):
        torch.manual_seed(0)
        model = MODELS.build(tiny_config(toy).model)
    model.init_weights()
    with torch.no_grad():
        model.transformer.query_embedding.weight.mul_(8)
        for layer in model.transformer.decoder.layers:
            # The query and key projections: sharper attention weights.
            for name, module in layer.cross_attn.named_children():
                if name.startswith(('query_', 'key_')):
                    module.weight.mul_(8)
        model.bbox_head.cls_branch.weight.normal_(0.0, EMBED_DIMS**-0.5)
        model.bbox_head.cls_branch.bias.zero_()
    return model.eval()


@pytest.fixture(scope='module')
def conditional(toy):
    """The tiny model and its program with dynamic batch, height and
    width, traced at 2 x 96 x 128."""
    model = build_tiny_model(toy)
    program = export_detector(
        model, example_images(96, 128, batch_size=2), dynamic=True)
    return model, program


@pytest.fixture(scope='module')
def checkpoint(toy, conditional, tmp_path_factory):
    """Folder, config and checkpoint files of the tiny model's weights,
    and its ``dataset_meta``."""
    model, _ = conditional
    folder = tmp_path_factory.mktemp('conditional_checkpoint')
    cfg = tiny_config(toy)
    config_path = str(folder / 'tiny_conditional.py')
    cfg.dump(config_path)
    classes = list(cfg.test_dataloader.dataset.metainfo.classes)
    dataset_meta = dict(
        classes=classes,
        palette=[[40 * index % 256, 90, 200] for index in range(len(classes))])
    checkpoint_path = str(folder / 'tiny_conditional.pth')
    torch.save(
        dict(
            state_dict=model.state_dict(),
            meta=dict(dataset_meta=dataset_meta)), checkpoint_path)
    return folder, config_path, checkpoint_path, dataset_meta


@pytest.fixture(scope='module')
def dynamic_onnx(conditional, checkpoint):
    """The dynamic program written as ONNX (checked by the exporter), with
    the class names the export tool stores."""
    from ddetr_plugin.deployment.onnx_export import export_onnx_program
    _, program = conditional
    folder, _, _, dataset_meta = checkpoint
    return export_onnx_program(
        program, str(folder / 'dynamic.onnx'), metadata=dataset_meta)


def load_tool(*parts):
    return load_script(osp.join(*parts), 'conditional_' + parts[-1][:-3])


def test_scores_are_spread(toy, conditional):
    # Label and order equality must not rest on near-ties.
    model, _ = conditional
    all_scores = []
    for seed, (height, width, image_shapes) in enumerate(toy.run_batches):
        images = toy.padded_images(image_shapes, height, width, seed + 1)
        dets, _ = toy.predict(model, images, image_shapes)
        scores = dets[..., 4]
        assert (scores[:, :-1] - scores[:, 1:] > 1e-5).all()
        all_scores.append(scores.flatten())
    all_scores = torch.cat(all_scores)
    assert all_scores.max() < 0.99
    assert all_scores.max() - all_scores.min() > 0.1


def test_torch_export_gives_predict_detections(toy, conditional):
    model, program = conditional
    exported = program.module()
    for seed, (height, width, image_shapes) in enumerate(toy.run_batches):
        images = toy.padded_images(image_shapes, height, width, seed + 1)
        with torch.no_grad():
            dets, labels = exported(images, torch.tensor(image_shapes))
        toy.assert_same_detections(dets, labels,
                                   *toy.predict(model, images, image_shapes))


def test_export_needs_the_compiled_op_only_for_deformable_attention(
        toy, conditional, monkeypatch):
    model, _ = conditional
    monkeypatch.setattr(torch_export, 'extension_loaded', lambda: False)
    assert not torch_export.uses_deformable_attention(model)
    torch_export.check_exportable(model)
    deformable = toy.build_model('plain')
    assert torch_export.uses_deformable_attention(deformable)
    with pytest.raises(RuntimeError, match='compiled op'):
        torch_export.check_exportable(deformable)


def test_dynamic_export_takes_images_smaller_than_deformable_detrs(
        toy, conditional, dynamic_onnx):
    # The toy backbone is DC5 (largest stride 16): from 17 px up, where
    # Deformable DETR (stride 64) needs 65.
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    model, program = conditional
    assert torch_export.min_dynamic_side(model) == 17
    detector = OnnxRuntimeDetector(dynamic_onnx, num_threads=1)
    image_shapes = [(17, 40), (30, 23)]
    images = toy.padded_images(image_shapes, 30, 40, 7)
    expected = toy.predict(model, images, image_shapes)
    with torch.no_grad():
        dets, labels = program.module()(images, torch.tensor(image_shapes))
    toy.assert_same_detections(dets, labels, *expected)
    dets, labels = detector(images, image_shapes)
    toy.assert_same_detections(
        torch.from_numpy(dets), torch.from_numpy(labels), *expected)
    with pytest.raises(ValueError, match=r'17 to 4096 px.*stride 16'):
        export_detector(
            model, example_images(16, 40, batch_size=2), dynamic=True)


def test_dynamic_onnx_gives_predict_detections(toy, conditional, dynamic_onnx):
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    model, _ = conditional
    detector = OnnxRuntimeDetector(dynamic_onnx, num_threads=1)
    assert detector.input_shape == ('batch', 3, 'height', 'width')
    assert tuple(detector.session.get_inputs()[1].shape) == ('batch', 2)
    # No deformable attention, so no sampling mode to record.
    assert 'sampling' not in detector.metadata
    # Non-square batches of other sizes than the trace, padded ones
    # included.
    toy.assert_onnx_matches(model, dynamic_onnx)


def test_export_tool_writes_a_fixed_size_model(toy, conditional, checkpoint,
                                               capsys):
    from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
    model, _ = conditional
    folder, config_path, checkpoint_path, _ = checkpoint
    path = str(folder / 'fixed.onnx')
    tool = load_tool('tools', 'deployment', 'export_onnx.py')
    assert tool.main([
        config_path, checkpoint_path, '--out', path, '--shape',
        *map(str, TOOL_SHAPE)
    ]) == 0
    output = capsys.readouterr().out
    assert 'dense attention' in output and 'labels equal' in output
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.input_shape == (1, 3, *TOOL_SHAPE)
    assert detector.metadata['classes'][0] == 'red square'
    assert 'sampling' not in detector.metadata
    # An image filling the input, and a smaller one padded into it.
    for seed, image_shape in enumerate(TOOL_IMAGES):
        images = toy.padded_images([image_shape], *TOOL_SHAPE, seed)
        dets, labels = detector(images, [image_shape])
        toy.assert_same_detections(dets, labels,
                                   *toy.predict(model, images, [image_shape]))


def test_export_tool_refuses_sampling_for_dense_attention(toy, checkpoint):
    folder, config_path, checkpoint_path, _ = checkpoint
    path = folder / 'gather.onnx'
    tool = load_tool('tools', 'deployment', 'export_onnx.py')
    with pytest.raises(ValueError) as error:
        tool.main([
            config_path, checkpoint_path, '--out',
            str(path), '--sampling', 'gather'
        ])
    message = str(error.value)
    assert '--sampling gather' in message and config_path in message
    assert 'ConditionalDETR' in message and 'Leave --sampling out' in message
    assert not path.exists()


def test_demo_draws_the_same_detections_from_onnx(toy, checkpoint,
                                                  dynamic_onnx):
    folder, config_path, checkpoint_path, _ = checkpoint
    # Non-square: the test pipeline resizes it to 77 x 128.
    image = np.random.default_rng(0).integers(
        0, 256, (120, 200, 3), dtype=np.uint8)
    image_path = str(folder / 'image.png')
    mmcv.imwrite(image, image_path)
    common = ['--score-thr', '0.3', '--device', 'cpu', '--min-size', '1']
    pytorch = toy.run_demo([
        image_path, config_path, '--weights', checkpoint_path, '--out-dir',
        str(folder / 'vis_pytorch'), *common
    ])
    onnx = toy.run_demo([
        image_path, config_path, '--onnx', dynamic_onnx, '--out-dir',
        str(folder / 'vis_onnx'), *common
    ])
    for run in ('pytorch', 'onnx'):
        drawn = mmcv.imread(str(folder / f'vis_{run}' / 'image.png'))
        assert drawn.shape == image.shape
    assert len(pytorch) > 0
    # The dynamic model takes the image unpadded, as PyTorch does.
    assert len(onnx) == len(pytorch)
    for (name, score, box), (expected_name, expected_score,
                             expected_box) in zip(onnx, pytorch):
        assert name == expected_name
        assert abs(score - expected_score) <= 1e-3
        # Printed to 0.1 px, in the original image's pixels.
        np.testing.assert_allclose(box, expected_box, atol=0.11)
