"""ONNX Runtime against PyTorch's ``predict``, for the three variants.

The two-stage variant, the one that uses every part of the model, is
exported once with dynamic batch, height and width and written in both
sampling modes; each file runs at two image sizes and a batch of two. The
plain and refinement variants are exported at a fixed size. Same labels,
scores within 1e-4 and boxes within 1e-2 px, as the deployment promises.
"""
import pytest
import torch

from ddetr_plugin.deployment import example_images, export_detector
from ddetr_plugin.deployment.onnx_export import (check_onnx_file,
                                                 export_onnx_program)
from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
from ddetr_plugin.ops import extension_loaded

pytestmark = pytest.mark.skipif(
    not extension_loaded(), reason='exporting needs the compiled op')

# (bs, h, w): two sizes, the second a batch of two; neither is the size the
# model was traced with (2 x 96 x 128).
RUN_SHAPES = ((1, 72, 104), (2, 112, 80))


def check_detections(toy, detector, model, batch_size, height, width, seed):
    images = example_images(height, width, batch_size, seed=seed)
    dets, labels = detector(images)
    assert dets.shape == (batch_size, toy.max_per_img, 5)
    toy.assert_same_detections(dets, labels, *toy.predict(model, images))
    # Sorted by score, as mmdet's predict.
    scores = torch.from_numpy(dets[..., 4])
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@pytest.mark.parametrize('sampling', ['grid_sample', 'gather'])
def test_dynamic_two_stage_onnx_matches_predict(toy, two_stage_program,
                                                tmp_path, sampling):
    model, program = two_stage_program
    path = str(tmp_path / f'two_stage_{sampling}.onnx')
    export_onnx_program(program, path, sampling=sampling)
    check_onnx_file(path)
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.metadata['sampling'] == sampling
    # Batch, height and width are named dynamic axes.
    assert all(
        isinstance(size, str)
        for size in detector.input_shape[:1] + detector.input_shape[2:])
    for seed, (batch_size, height, width) in enumerate(RUN_SHAPES):
        check_detections(toy, detector, model, batch_size, height, width,
                         seed + 1)


@pytest.mark.parametrize('variant', ['plain', 'refine'])
def test_fixed_size_onnx_matches_predict(toy, tmp_path, variant):
    model = toy.build_model(variant)
    path = str(tmp_path / f'{variant}.onnx')
    program = export_detector(model, example_images(80, 112))
    export_onnx_program(program, path)
    detector = OnnxRuntimeDetector(path, num_threads=1)
    assert detector.input_shape == (1, 3, 80, 112)
    check_detections(toy, detector, model, 1, 80, 112, seed=1)
    with pytest.raises(ValueError, match='export with --dynamic'):
        detector(example_images(96, 112))
