"""ONNX export of the detector through ``torch.export``.

The program from :func:`export_detector` goes to the ONNX exporter
(``torch.onnx.export(..., dynamo=True)``), which writes the plugin's op in
standard operators (:mod:`.onnx_ms_deform_attn`), as ``sampling`` says;
Conditional DETR's dense attention is written by the exporter itself
(MatMul, Softmax), and ``sampling`` does not apply to it. The file is then
checked by ``onnx.checker`` and ONNX shape inference.

The exporter's graph optimisation is left off: it wrote invalid models for
the refinement and two-stage variants (a Clip fusion around
``inverse_sigmoid`` applied twice to one tensor).
"""
import json
import re
from typing import Dict, Optional

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from .onnx_ms_deform_attn import (EXPORT_MODES,
                                  register_tensorrt_plugin_schema,
                                  translation_table)
from .requirements import require
from .torch_export import INPUT_NAMES, OUTPUT_NAMES, export_detector

# Names of the input's dynamic axes, by position in (N, 3, H, W).
DYNAMIC_AXIS_NAMES = {0: 'batch', 2: 'height', 3: 'width'}

# The ONNX exporter of torch writes opset 18 and converts to other opsets.
DEFAULT_OPSET = 18
MIN_OPSET = 17
# GridSample: measured faster than gather in ONNX Runtime on CPU (see
# docs/benchmarks.md).
DEFAULT_SAMPLING = 'grid_sample'


def check_opset(sampling: str, opset: int) -> None:
    """Raise a ValueError for a sampling mode or opset that cannot work.

    Args:
        sampling (str): ``'gather'`` or ``'grid_sample'``.
        opset (int): Target ONNX opset.
    """
    if sampling not in EXPORT_MODES:
        raise ValueError(f'--sampling must be one of {EXPORT_MODES}, got '
                         f'{sampling!r}.')
    # One minimum for every mode: it is above GridSample's opset 16, so
    # no advice to switch modes would help.
    if opset < MIN_OPSET:
        raise ValueError(
            f'--opset {opset} is too low for every --sampling: the model '
            f'uses LayerNormalization, an ONNX operator since opset '
            f'{MIN_OPSET}, and the exporter converts down to opset '
            f'{MIN_OPSET} at the lowest; use --opset {MIN_OPSET} or higher '
            f'(the default is {DEFAULT_OPSET}).')


def export_onnx(detector: nn.Module,
                images: Tensor,
                path: str,
                sampling: str = DEFAULT_SAMPLING,
                opset: int = DEFAULT_OPSET,
                dynamic: bool = False,
                metadata: Optional[Dict[str, object]] = None) -> str:
    """Write the detector as an ONNX model and check it.

    Args:
        detector (nn.Module): A ``DeformableDETR`` or ``ConditionalDETR``
            in eval mode, on CPU.
        images (Tensor): (bs, 3, h, w) example batch, normalised; with
            ``dynamic``, bs must be at least 2.
        path (str): The ``.onnx`` file to write.
        sampling (str): How the plugin's op is written: ``'grid_sample'``
            or ``'gather'`` (standard operators), or ``'trt_plugin'``
            (TensorRT's plugin node, which ONNX Runtime cannot run).
            Ignored for a detector without the op (Conditional DETR).
        opset (int): Target ONNX opset.
        dynamic (bool): Whether batch, height and width are dynamic axes.
        metadata (dict, optional): Stored in the model's metadata, each
            value as JSON (e.g. the class names), with ``sampling`` where
            the op is in the model.

    Returns:
        str: ``path``.
    """
    check_opset(sampling, opset)
    program = export_detector(detector, images, dynamic=dynamic)
    return export_onnx_program(program, path, sampling, opset, metadata)


def export_onnx_program(program: ExportedProgram,
                        path: str,
                        sampling: str = DEFAULT_SAMPLING,
                        opset: int = DEFAULT_OPSET,
                        metadata: Optional[Dict[str, object]] = None) -> str:
    """Write a program of :func:`export_detector` as ONNX and check it.

    Args:
        program (ExportedProgram): ``images`` -> ``(dets, labels)``; its
            dynamic dimensions become the ONNX model's dynamic axes.
        path (str): The ``.onnx`` file to write.
        sampling (str): See :func:`export_onnx`.
        opset (int): Target ONNX opset.
        metadata (dict, optional): See :func:`export_onnx`.

    Returns:
        str: ``path``.
    """
    require('onnxscript', 'The ONNX exporter of torch')
    require('onnx', 'Checking the exported ONNX model')
    check_opset(sampling, opset)
    metadata = dict(metadata or {})
    translations = None
    # Without the op (Conditional DETR) there is nothing to translate,
    # and the op need not even be registered.
    if runs_deformable_op(program):
        translations = translation_table(sampling, opset)
        metadata['sampling'] = sampling
    onnx_program = torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        custom_translation_table=translations,
        optimize=False)
    name_dynamic_axes(onnx_program.model)
    for key, value in metadata.items():
        onnx_program.model.metadata_props[key] = json.dumps(value)
    onnx_program.save(path)
    check_onnx_file(path)
    return path


def runs_deformable_op(program: ExportedProgram) -> bool:
    """Whether the program calls the plugin's op (multi-scale deformable
    attention), whose ONNX form ``sampling`` chooses.

    Args:
        program (ExportedProgram): A program of :func:`export_detector`.

    Returns:
        bool: True for Deformable DETR, False for Conditional DETR.
    """
    return any(node.op == 'call_function'
               and getattr(node.target, 'namespace', None) == 'ddetr_plugin'
               for node in program.graph.nodes)


def name_dynamic_axes(model) -> Dict[str, str]:
    """Give the input's dynamic axes the names ``batch``, ``height`` and
    ``width`` in every shape of the model.

    The exporter names them after torch.export's symbols (``s34``...), and
    writes sizes derived from them as expressions (``2*s34``); both are
    rewritten, so that ONNX Runtime and TensorRT users see
    ``input: [batch, 3, height, width]`` and ``dets: [batch, K, 5]``.

    Args:
        model (onnx_ir.Model): The exporter's model, changed in place.

    Returns:
        dict: The symbols renamed, e.g. ``{'s34': 'batch'}``; empty for a
        model of fixed size.
    """
    ir = require('onnx_ir', 'Naming the dynamic axes')
    graph = model.graph
    image_input = graph.inputs[0]
    renames = {}
    for axis, name in DYNAMIC_AXIS_NAMES.items():
        dim = image_input.shape[axis]
        if isinstance(dim, ir.SymbolicDim) and dim.value:
            renames[dim.value] = name
    if not renames:
        return renames
    # Whole symbols only: ``s3`` must not touch ``s34``.
    pattern = re.compile(r'\b(' + '|'.join(map(re.escape, renames)) + r')\b')

    def rename(dim):
        if not isinstance(dim, ir.SymbolicDim) or not dim.value:
            return dim
        return ir.SymbolicDim(
            pattern.sub(lambda match: renames[match.group(1)], dim.value))

    values = list(graph.inputs) + list(graph.outputs)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values.extend(node.outputs)
    for value in values:
        if value.shape is not None:
            value.shape = ir.Shape([rename(dim) for dim in value.shape])
    return renames


def check_onnx_file(path: str) -> None:
    """``onnx.checker`` and strict shape inference on a model file.

    Args:
        path (str): The ``.onnx`` file.

    Raises:
        onnx.checker.ValidationError, onnx.shape_inference
        .InferenceError: The model is invalid.
    """
    onnx = require('onnx', 'Checking the exported ONNX model')
    # A model written with --sampling trt_plugin holds TensorRT's node.
    register_tensorrt_plugin_schema()
    onnx.checker.check_model(path, full_check=True)
    onnx.shape_inference.infer_shapes(
        onnx.load(path), check_type=True, strict_mode=True)
