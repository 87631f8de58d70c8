"""The exported two-stage detector against PyTorch: the ``torch.export``
program (saved and loaded) and ONNX Runtime in both sampling modes.

The two-stage variant uses every part of the model. It is exported once,
with dynamic batch, height and width, and that one program serves every
test here; each ONNX file runs at two image sizes and a batch of two, none
of them the traced size. Same labels, scores within 1e-4 and boxes within
1e-2 px, as the deployment promises. The plain and refinement variants are
in ``test_export_parity_plain_refine.py`` (a file of its own, so that the
two halves run on different workers).
"""
import pytest
import torch

from ddetr_plugin.deployment import (TensorDetector, example_images,
                                     load_program, save_program)
from ddetr_plugin.ops import extension_loaded

pytestmark = pytest.mark.skipif(
    not extension_loaded(), reason='exporting needs the compiled op')


def op_nodes(program):
    return [
        node for node in program.graph.nodes
        if node.op == 'call_function' and 'ms_deform_attn' in str(node.target)
    ]


def test_exported_program_saves_loads_and_matches_eager(
        toy, dynamic_program, tmp_path):
    model, program = dynamic_program('two_stage')
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


@pytest.mark.parametrize('sampling', ['grid_sample', 'gather'])
def test_dynamic_onnx_matches_predict(toy, dynamic_program, tmp_path,
                                      sampling):
    model, program = dynamic_program('two_stage')
    toy.assert_dynamic_onnx_matches(
        model, program, str(tmp_path / f'two_stage_{sampling}.onnx'), sampling)
