"""The exported detector against PyTorch's ``predict``, for the three
variants: the ``torch.export`` program (saved and loaded) and ONNX Runtime.

Every variant is exported once, with dynamic batch, height and width, and
that one program serves all the tests of the variant. Each ONNX file runs
at two image sizes and a batch of two, none of them the traced size. Both
sampling modes are written for the two-stage variant, the one that uses
every part of the model; the plain and refinement variants take one mode
each, so that each mode is checked on two variants (the op alone is checked
in both modes against the reference in ``test_onnx_ms_deform_attn.py``).
Same labels, scores within 1e-4 and boxes within 1e-2 px, as the deployment
promises.
"""
import pytest
import torch

from ddetr_plugin.deployment import (TensorDetector, example_images,
                                     load_program, save_program)
from ddetr_plugin.deployment.onnx_export import (check_onnx_file,
                                                 export_onnx_program)
from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
from ddetr_plugin.ops import extension_loaded

pytestmark = pytest.mark.skipif(
    not extension_loaded(), reason='exporting needs the compiled op')

# (bs, h, w): two sizes, the second a batch of two; neither is the size the
# models were traced with (2 x 96 x 128).
RUN_SHAPES = ((1, 72, 104), (2, 112, 80))


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


@pytest.mark.parametrize('variant, sampling', [('plain', 'gather'),
                                               ('refine', 'grid_sample'),
                                               ('two_stage', 'grid_sample'),
                                               ('two_stage', 'gather')])
def test_dynamic_onnx_matches_predict(toy, dynamic_program, tmp_path, variant,
                                      sampling):
    model, program = dynamic_program(variant)
    path = str(tmp_path / f'{variant}_{sampling}.onnx')
    export_onnx_program(program, path, sampling=sampling)
    check_onnx_file(path)
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.metadata['sampling'] == sampling
    # The dynamic axes carry their names, in the input and the outputs.
    assert detector.input_shape == ('batch', 3, 'height', 'width')
    output_shapes = [
        tuple(output.shape) for output in detector.session.get_outputs()
    ]
    assert output_shapes == [('batch', toy.max_per_img, 5),
                             ('batch', toy.max_per_img)]
    for seed, (batch_size, height, width) in enumerate(RUN_SHAPES):
        images = example_images(height, width, batch_size, seed=seed + 1)
        dets, labels = detector(images)
        assert dets.shape == (batch_size, toy.max_per_img, 5)
        toy.assert_same_detections(dets, labels, *toy.predict(model, images))
        # Sorted by score, as mmdet's predict.
        scores = torch.from_numpy(dets[..., 4])
        assert (scores[:, :-1] >= scores[:, 1:]).all()
