"""The exported two-stage detector against PyTorch: the ``torch.export``
program (saved and loaded) and ONNX Runtime in both sampling modes.

The two-stage variant uses every part of the model. It is exported once,
with dynamic batch, height and width, and that one program serves every
test here; each ONNX file runs an unpadded image and two padded batches of
images of different, non-square sizes, none of them the traced size, and
is compared with ``predict`` of the same padded batch. A static export
(``test_static_onnx_masks_the_padding``) takes smaller images padded to
its size. Same labels, scores within 1e-4 and boxes within 1e-2 px, as the
deployment promises. The plain and refinement variants are
in ``test_export_parity_plain_refine.py`` (a file of its own, so that the
two halves run on different workers).
"""
import pytest
import torch

from ddetr_plugin.deployment import TensorDetector, load_program, save_program
from ddetr_plugin.deployment.requirements import require


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
    for seed, (height, width, image_shapes) in enumerate(
        ((72, 96, [(72, 96)]), (80, 112, [(80, 112), (66, 112), (80, 70)]))):
        images = toy.padded_images(image_shapes, height, width, seed)
        image_shapes_tensor = torch.tensor(image_shapes)
        with torch.no_grad():
            expected = eager(images, image_shapes_tensor)
            dets, labels = loaded(images, image_shapes_tensor)
        assert dets.shape == (len(image_shapes), toy.max_per_img, 5)
        torch.testing.assert_close(dets, expected[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(labels, expected[1])
        # And the wrapper itself is predict's output.
        toy.assert_same_detections(dets, labels,
                                   *toy.predict(model, images, image_shapes))


@pytest.mark.parametrize('sampling', ['grid_sample', 'gather'])
def test_dynamic_onnx_matches_predict(toy, dynamic_program, tmp_path,
                                      sampling):
    model, program = dynamic_program('two_stage')
    toy.assert_dynamic_onnx_matches(
        model, program, str(tmp_path / f'two_stage_{sampling}.onnx'), sampling)


def test_static_onnx_masks_the_padding(toy, compiled_op, tmp_path, capfd):
    model = toy.build_model('two_stage')
    path = str(tmp_path / 'static.onnx')
    toy.assert_static_onnx_matches(model, path)
    # The exporter writes CastLike nodes, on which ONNX Runtime warns
    # (about 30 coloured lines a session) unless told to log errors only.
    onnx = require('onnx', 'This test')
    node_types = [node.op_type for node in onnx.load(path).graph.node]
    assert 'CastLike' in node_types
    assert 'CastLike' not in capfd.readouterr().err
