"""ONNX Runtime against PyTorch's ``predict`` for the plain and refinement
variants, each exported once with dynamic batch, height and width, and
once for a fixed size, on padded batches of non-square images.

Each variant is written in one sampling mode, so that, with the two-stage
variant's two files (``test_export_parity.py``), each mode is checked on
two variants; the op alone is checked in both modes against the reference
in ``test_onnx_ms_deform_attn.py``.
"""
import pytest


@pytest.mark.parametrize('variant, sampling', [('plain', 'gather'),
                                               ('refine', 'grid_sample')])
def test_dynamic_onnx_matches_predict(toy, dynamic_program, tmp_path, variant,
                                      sampling):
    model, program = dynamic_program(variant)
    toy.assert_dynamic_onnx_matches(
        model, program, str(tmp_path / f'{variant}_{sampling}.onnx'), sampling)


@pytest.mark.parametrize('variant', ['plain', 'refine'])
def test_static_onnx_masks_the_padding(toy, compiled_op, tmp_path, variant):
    model = toy.build_model(variant)
    toy.assert_static_onnx_matches(model, str(tmp_path / f'{variant}.onnx'))
