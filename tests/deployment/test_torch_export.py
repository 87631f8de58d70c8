"""``torch.export`` of the detector: dynamic size, the op as one node, and
a saved program that loads and gives eager's detections."""
import pytest
import torch

from ddetr_plugin.deployment import (TensorDetector, example_images,
                                     export_detector, load_program,
                                     save_program)
from ddetr_plugin.ops import extension_loaded

pytestmark = pytest.mark.skipif(
    not extension_loaded(), reason='exporting needs the compiled op')


def op_nodes(program):
    return [
        node for node in program.graph.nodes
        if node.op == 'call_function' and 'ms_deform_attn' in str(node.target)
    ]


def test_exported_program_saves_loads_and_matches_eager(
        toy, two_stage_program, tmp_path):
    model, program = two_stage_program
    # One op node per deformable attention: 1 encoder + 2 decoder layers.
    nodes = op_nodes(program)
    assert len(nodes) == 3
    assert all(
        node.target == torch.ops.ddetr_plugin.ms_deform_attn_forward.default
        for node in nodes)

    path = str(tmp_path / 'two_stage.pt2')
    save_program(program, path)
    loaded = load_program(path).module()
    eager = TensorDetector(model)
    for seed, (batch_size, height, width) in enumerate(
        ((1, 72, 96), (3, 80, 112))):
        images = example_images(height, width, batch_size, seed=seed)
        with torch.no_grad():
            expected = eager(images)
            dets, labels = loaded(images)
        assert dets.shape == (batch_size, toy.max_per_img, 5)
        torch.testing.assert_close(dets, expected[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(labels, expected[1])
        # And the wrapper itself is predict's output.
        toy.assert_same_detections(dets, labels, *toy.predict(model, images))


def test_export_refuses_training_mode_and_a_batch_of_one(toy):
    model = toy.build_model('plain')
    with pytest.raises(ValueError, match='at least 2 images'):
        export_detector(model, example_images(64, 64), dynamic=True)
    with pytest.raises(RuntimeError, match='eval mode'):
        export_detector(model.train(), example_images(64, 64))


class DataDependentBackbone(torch.nn.Module):
    """A backbone whose Python control flow reads tensor values."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        if images.mean() > 0:
            images = images * 2
        return self.backbone(images)


def test_a_backbone_that_cannot_export_is_named(toy):
    model = toy.build_model('plain')
    model.backbone = DataDependentBackbone(model.backbone)
    with pytest.raises(
            RuntimeError,
            match='backbone DataDependentBackbone cannot be '
            'traced by torch.export'):
        export_detector(model, example_images(96, 96))
