"""Multi-scale deformable attention written in standard ONNX operators.

``torch.export`` keeps the plugin's op as one node,
``ddetr_plugin::ms_deform_attn_forward``. ONNX has no such operator, so the
ONNX exporter is given, through its ``custom_translation_table``, a function
that writes the op's computation in standard operators instead. ONNX
Runtime and TensorRT (>= 8.5) then run the model without any plugin.

Both formulations compute the op's semantics exactly: bilinear sampling
with zero padding and ``align_corners=False`` (location ``x`` in [0, 1] on a
level of width ``w`` is pixel ``x * w - 0.5``), NaN or infinite locations
reading zeros, and the attention-weighted sum over levels and points.

- ``gather``: the four bilinear neighbours of every sampling point are
  gathered from the flattened value by index, for all levels at once. Any
  opset; avoids the GridSample route that some TensorRT versions compile
  wrongly.
- ``grid_sample``: one ``GridSample`` per level (opset >= 16).

A third form, ``trt_plugin``, is not standard operators: the op becomes one
node ``MultiscaleDeformableAttnPlugin_TRT`` (domain ``trt.plugins``), the
layout of TensorRT's own plugin of that name (TensorRT OSS plugins): inputs
value (bs, num_keys, num_heads, head_dims), spatial_shapes and
level_start_index as int32, sampling_locations and attention_weights as
the op has them; output (bs, num_queries, num_heads, head_dims). TensorRT's
ONNX parser maps the node to the plugin by its name; ONNX Runtime cannot
run it.

The exported model computes in float32, so the constants and casts below
are float32.

Level sizes are read from the ``spatial_shapes`` tensor inside the graph,
so one model serves every input size. The Python loops below run over the
levels and the four neighbours, both fixed by the model, never over sizes
that grow with the input.

Shape shorthand: bs images, num_keys flattened positions of all levels,
num_heads heads of head_dims channels, num_queries queries, num_levels
levels, num_points points per level.
"""
import importlib
from typing import Callable, Dict

# The formulations in standard operators, which ONNX Runtime runs.
SAMPLING_MODES = ('gather', 'grid_sample')
# The op as TensorRT's plugin node; every form the exporter can write.
TENSORRT_PLUGIN = 'trt_plugin'
EXPORT_MODES = SAMPLING_MODES + (TENSORRT_PLUGIN, )
# GridSample entered the default ONNX domain in opset 16.
MIN_GRID_SAMPLE_OPSET = 16
# ONNX element types (onnx.TensorProto), without importing onnx here.
FLOAT, INT32, INT64 = 1, 6, 7
# TensorRT's plugin: its registered name and version, and the ONNX domain
# of the node (the parser looks plugins up by name, whatever the domain).
TENSORRT_PLUGIN_NAME = 'MultiscaleDeformableAttnPlugin_TRT'
TENSORRT_PLUGIN_DOMAIN = 'trt.plugins'
TENSORRT_PLUGIN_VERSION = 1


def _opset(version: int):
    """The onnxscript module that writes operators of ONNX opset
    ``version``."""
    onnxscript = importlib.import_module('onnxscript')
    if not hasattr(onnxscript, f'opset{version}'):
        raise ValueError(f'onnxscript {onnxscript.__version__} cannot write '
                         f'ONNX opset {version}; choose an opset it knows.')
    return getattr(onnxscript, f'opset{version}')


def gather_translation(version: int) -> Callable:
    """The op as Gather, Floor and MatMul of opset ``version``.

    Args:
        version (int): Target ONNX opset.

    Returns:
        Callable: The translation of ``ms_deform_attn_forward``; see
        :func:`ms_deform_attn_gather` inside for the shapes.
    """
    op = _opset(version)

    def ms_deform_attn_gather(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights):
        """Sample by gathering the four neighbours of every point.

        Args:
            value: (bs, num_keys, num_heads, head_dims), levels flattened
                one after another.
            spatial_shapes: (num_levels, 2) int64, (h, w) per level.
            level_start_index: (num_levels,) int64.
            sampling_locations: (bs, num_queries, num_heads, num_levels,
                num_points, 2), normalised (x, y).
            attention_weights: (bs, num_queries, num_heads, num_levels,
                num_points).

        Returns:
            (bs, num_queries, num_heads * head_dims).
        """
        num_heads, head_dims = value.shape[2], value.shape[3]
        locations = sampling_locations

        def per_level(tensor):
            # (num_levels,) -> (1, 1, 1, num_levels, 1), to broadcast over
            # (bs, num_queries, num_heads, num_levels, num_points).
            return op.Reshape(tensor, op.Constant(value_ints=[1, 1, 1, -1, 1]))

        zero_index = op.Constant(value_int=0)
        one_index = op.Constant(value_int=1)
        heights = per_level(op.Gather(spatial_shapes, zero_index, axis=1))
        widths = per_level(op.Gather(spatial_shapes, one_index, axis=1))
        float_heights = op.Cast(heights, to=FLOAT)
        float_widths = op.Cast(widths, to=FLOAT)
        half = op.Constant(value_float=0.5)
        one = op.Constant(value_float=1.0)
        zero = op.Constant(value_float=0.0)
        # Pixel coordinates, (bs, num_queries, num_heads, num_levels,
        # num_points) each; align_corners=False puts pixel centres at +0.5.
        x = op.Sub(
            op.Mul(op.Gather(locations, zero_index, axis=5), float_widths),
            half)
        y = op.Sub(
            op.Mul(op.Gather(locations, one_index, axis=5), float_heights),
            half)
        left, top = op.Floor(x), op.Floor(y)
        right_weight, bottom_weight = op.Sub(x, left), op.Sub(y, top)
        # (coordinate, bilinear weight) of the two neighbours on each axis
        left_weight, top_weight = op.Sub(one, right_weight), op.Sub(
            one, bottom_weight)
        columns = [(left, left_weight), (op.Add(left, one), right_weight)]
        rows = [(top, top_weight), (op.Add(top, one), bottom_weight)]

        # The value as rows of head_dims channels, image by image, head by
        # head: (bs * num_heads * num_keys, head_dims).
        value_rows = op.Reshape(
            op.Transpose(value, perm=[0, 2, 1, 3]),
            op.Constant(value_ints=[-1, head_dims]))
        batch_size = op.Squeeze(op.Shape(value, start=0, end=1))
        num_keys = op.Squeeze(op.Shape(value, start=1, end=2))
        images = op.Range(
            op.Constant(value_int=0), batch_size, op.Constant(value_int=1))
        heads = op.Constant(value_ints=list(range(num_heads)))
        # Row of key 0 of each (image, head), (bs, 1, num_heads, 1, 1).
        first_rows = op.Mul(
            op.Add(
                op.Mul(
                    op.Reshape(images,
                               op.Constant(value_ints=[-1, 1, 1, 1, 1])),
                    op.Constant(value_int=num_heads)),
                op.Reshape(heads, op.Constant(value_ints=[1, 1, -1, 1, 1]))),
            num_keys)
        level_rows = op.Add(first_rows, per_level(level_start_index))

        output = None
        for column, column_weight in columns:
            for row, row_weight in rows:
                # Comparisons with NaN are false: such points read zeros.
                inside = op.And(
                    op.And(
                        op.GreaterOrEqual(column, zero),
                        op.Less(column, float_widths)),
                    op.And(
                        op.GreaterOrEqual(row, zero),
                        op.Less(row, float_heights)))
                # Outside points index key 0 with a zero weight, so no
                # index ever leaves the value.
                column_index = op.Cast(
                    op.Where(inside, column, zero), to=INT64)
                row_index = op.Cast(op.Where(inside, row, zero), to=INT64)
                keys = op.Add(level_rows,
                              op.Add(op.Mul(row_index, widths), column_index))
                weight = op.Mul(
                    op.Where(inside, op.Mul(column_weight, row_weight), zero),
                    attention_weights)
                # (bs, num_queries, num_heads, num_levels, num_points,
                # head_dims)
                sampled = op.Gather(value_rows, keys, axis=0)
                # Sum over levels and points as one product:
                # (..., 1, num_levels * num_points) @
                # (..., num_levels * num_points, head_dims)
                part = op.MatMul(
                    op.Reshape(weight,
                               op.Constant(value_ints=[0, 0, 0, 1, -1])),
                    op.Reshape(
                        sampled,
                        op.Constant(value_ints=[0, 0, 0, -1, head_dims])))
                output = part if output is None else op.Add(output, part)
        # (bs, num_queries, num_heads, 1, head_dims) -> (bs, num_queries,
        # num_heads * head_dims)
        return op.Reshape(
            output, op.Constant(value_ints=[0, 0, num_heads * head_dims]))

    return ms_deform_attn_gather


def grid_sample_translation(version: int) -> Callable:
    """The op as one GridSample per level, of opset ``version`` (>= 16).

    Args:
        version (int): Target ONNX opset.

    Returns:
        Callable: The translation of ``ms_deform_attn_forward``, same
        inputs and output as the gather one.
    """
    if version < MIN_GRID_SAMPLE_OPSET:
        raise ValueError(
            f'sampling by GridSample needs ONNX opset >= '
            f'{MIN_GRID_SAMPLE_OPSET}, got opset {version}; raise the opset '
            'or sample by gather, which works at any opset.')
    op = _opset(version)
    # Opset 20 renamed the mode and generalised the operator.
    mode = 'linear' if version >= 20 else 'bilinear'

    def ms_deform_attn_grid_sample(value, spatial_shapes, level_start_index,
                                   sampling_locations, attention_weights):
        num_heads, head_dims = value.shape[2], value.shape[3]
        num_levels, num_points = (sampling_locations.shape[3],
                                  sampling_locations.shape[4])
        locations = sampling_locations

        def ints(*numbers):
            return op.Constant(value_ints=list(numbers))

        batch_size = op.Shape(value, start=0, end=1)
        num_queries = op.Shape(locations, start=1, end=2)
        # (bs, num_keys, num_heads, head_dims) -> (bs, num_heads,
        # head_dims, num_keys): each level becomes an image per head.
        channels_first = op.Transpose(value, perm=[0, 2, 3, 1])
        # GridSample reads [-1, 1]. NaN and infinite locations are moved
        # far outside, where zero padding reads zeros, as in the reference.
        far = op.Constant(value_float=4.0)
        grids = op.Sub(
            op.Mul(locations, op.Constant(value_float=2.0)),
            op.Constant(value_float=1.0))
        grids = op.Clip(
            op.Where(op.IsNaN(grids), op.Neg(far), grids), op.Neg(far), far)
        # (bs, num_queries, num_heads, num_levels, ...) -> (bs, num_heads,
        # num_queries, num_levels, ...)
        grids = op.Transpose(grids, perm=[0, 2, 1, 3, 4, 5])
        weights = op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4])
        grid_shape = op.Concat(
            ints(-1), num_queries, ints(num_points, 2), axis=0)
        weight_shape = op.Concat(
            ints(-1, 1), num_queries, ints(num_points), axis=0)

        output = None
        for level in range(num_levels):
            level_index = op.Constant(value_int=level)
            height = op.Slice(spatial_shapes, ints(level, 0),
                              ints(level + 1, 1), ints(0, 1))
            width = op.Slice(spatial_shapes, ints(level, 1),
                             ints(level + 1, 2), ints(0, 1))
            start = op.Slice(level_start_index, ints(level), ints(level + 1),
                             ints(0))
            end = op.Add(start, op.Mul(height, width))
            # (bs * num_heads, head_dims, h, w)
            level_value = op.Reshape(
                op.Slice(channels_first, op.Reshape(start, ints(1)),
                         op.Reshape(end, ints(1)), ints(3)),
                op.Concat(
                    ints(-1, head_dims),
                    op.Reshape(height, ints(1)),
                    op.Reshape(width, ints(1)),
                    axis=0))
            # (bs * num_heads, num_queries, num_points, 2)
            level_grid = op.Reshape(
                op.Gather(grids, level_index, axis=3), grid_shape)
            # (bs * num_heads, head_dims, num_queries, num_points)
            sampled = op.GridSample(
                level_value,
                level_grid,
                align_corners=0,
                mode=mode,
                padding_mode='zeros')
            level_weights = op.Reshape(
                op.Gather(weights, level_index, axis=3), weight_shape)
            # (bs * num_heads, head_dims, num_queries)
            part = op.ReduceSum(
                op.Mul(sampled, level_weights), ints(-1), keepdims=0)
            output = part if output is None else op.Add(output, part)
        # (bs * num_heads, head_dims, num_queries) -> (bs, num_queries,
        # num_heads * head_dims)
        output = op.Reshape(
            output,
            op.Concat(batch_size, ints(num_heads * head_dims, -1), axis=0))
        return op.Transpose(output, perm=[0, 2, 1])

    return ms_deform_attn_grid_sample


def register_tensorrt_plugin_schema():
    """Declare the TensorRT plugin node to ONNX (once per process).

    With the schema, onnxscript can write the node and ``onnx.checker`` and
    strict shape inference accept it (its output shape stays unknown to
    ONNX; TensorRT's plugin gives it).

    Returns:
        onnx.defs.OpSchema: The node's schema.
    """
    onnx = importlib.import_module('onnx')
    if onnx.defs.has(TENSORRT_PLUGIN_NAME, TENSORRT_PLUGIN_DOMAIN):
        return onnx.defs.get_schema(TENSORRT_PLUGIN_NAME,
                                    TENSORRT_PLUGIN_VERSION,
                                    TENSORRT_PLUGIN_DOMAIN)
    parameter = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        TENSORRT_PLUGIN_NAME,
        TENSORRT_PLUGIN_DOMAIN,
        TENSORRT_PLUGIN_VERSION,
        doc='Multi-scale deformable attention, run by TensorRT\'s plugin.',
        inputs=[
            parameter('value', 'T'),
            parameter('spatial_shapes', 'I'),
            parameter('level_start_index', 'I'),
            parameter('sampling_locations', 'T'),
            parameter('attention_weights', 'T')
        ],
        outputs=[parameter('output', 'T')],
        type_constraints=[('T', ['tensor(float)', 'tensor(float16)'],
                           'Features, locations and weights.'),
                          ('I', ['tensor(int32)'], 'Level sizes and starts.')])
    onnx.defs.register_schema(schema)
    return schema


def tensorrt_plugin_translation(version: int) -> Callable:
    """The op as one node of TensorRT's plugin layout, in a model of opset
    ``version``.

    Args:
        version (int): Target ONNX opset (of the casts and the reshape
            around the node).

    Returns:
        Callable: The translation of ``ms_deform_attn_forward``, same
        inputs and output as the others.
    """
    op = _opset(version)
    values = importlib.import_module('onnxscript.values')
    plugin = values.Op(
        values.Opset(TENSORRT_PLUGIN_DOMAIN, TENSORRT_PLUGIN_VERSION),
        TENSORRT_PLUGIN_NAME, register_tensorrt_plugin_schema())

    def ms_deform_attn_tensorrt_plugin(value, spatial_shapes,
                                       level_start_index, sampling_locations,
                                       attention_weights):
        num_heads, head_dims = value.shape[2], value.shape[3]
        # The plugin reads level sizes and starts as int32 and gives
        # (bs, num_queries, num_heads, head_dims).
        output = plugin(value, op.Cast(spatial_shapes, to=INT32),
                        op.Cast(level_start_index, to=INT32),
                        sampling_locations, attention_weights)
        return op.Reshape(
            output, op.Constant(value_ints=[0, 0, num_heads * head_dims]))

    return ms_deform_attn_tensorrt_plugin


def translation_table(sampling: str, opset: int) -> Dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export``.

    Args:
        sampling (str): ``'gather'``, ``'grid_sample'`` or ``'trt_plugin'``.
        opset (int): Target ONNX opset.

    Returns:
        dict: The plugin's op overload -> its ONNX translation.
    """
    import torch

    translations = dict(
        gather=gather_translation,
        grid_sample=grid_sample_translation,
        trt_plugin=tensorrt_plugin_translation)
    if sampling not in translations:
        raise ValueError(f'sampling must be one of {EXPORT_MODES}, got '
                         f'{sampling!r}')
    translate = translations[sampling]
    return {
        torch.ops.ddetr_plugin.ms_deform_attn_forward.default: translate(opset)
    }
