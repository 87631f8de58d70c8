"""The op's ONNX translations against the plain-PyTorch reference.

A module holding only the op is exported with dynamic level sizes and
query counts, then run in ONNX Runtime on two different level layouts,
with points outside the maps, on their border, NaN and infinite.

The deployment packages come as ``make setup`` installs them: a missing
one fails with the command that installs it (``require``), as in the rest
of ``tests/deployment``; only the compiled op, which a machine may lack,
skips the tests that export (the ``compiled_op`` fixture).
"""
import pytest
import torch
from torch.export import Dim

from ddetr_plugin.deployment.onnx_export import check_onnx_file
from ddetr_plugin.deployment.onnx_ms_deform_attn import (
    INT32, MIN_GRID_SAMPLE_OPSET, TENSORRT_PLUGIN_DOMAIN, TENSORRT_PLUGIN_NAME,
    grid_sample_translation, translation_table)
from ddetr_plugin.deployment.onnx_runtime import OnnxRuntimeDetector
from ddetr_plugin.deployment.requirements import require
from ddetr_plugin.ops import ms_deform_attn, ms_deform_attn_reference

NUM_HEADS, HEAD_DIMS, NUM_POINTS = 2, 4, 3
INPUT_NAMES = ('value', 'spatial_shapes', 'level_start_index',
               'sampling_locations', 'attention_weights')


class OpOnly(torch.nn.Module):

    def forward(self, value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index,
                              sampling_locations, attention_weights)


def op_inputs(level_shapes, num_queries, seed):
    """Inputs with locations in [-0.2, 1.2] and a few degenerate ones."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(level_shapes)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    num_levels = len(level_shapes)
    value = torch.randn(
        2, int(sizes.sum()), NUM_HEADS, HEAD_DIMS, generator=generator)
    locations = torch.rand(
        2,
        num_queries,
        NUM_HEADS,
        num_levels,
        NUM_POINTS,
        2,
        generator=generator) * 1.4 - 0.2
    locations[0, 0, 0, 0, 0] = torch.tensor([float('nan'), 0.5])
    locations[0, 0, 1, 0, 1] = torch.tensor([0.5, float('inf')])
    locations[1, 1, 0, -1, 0] = torch.tensor([-float('inf'), 0.2])
    locations[1, 1, 1, -1, 1] = torch.tensor([0.0, 1.0])  # map corners
    weights = torch.rand(
        2, num_queries, NUM_HEADS, num_levels, NUM_POINTS, generator=generator)
    return (value, spatial_shapes, level_start_index, locations, weights)


def export(path, sampling, opset=18):
    inputs = op_inputs([(6, 7), (3, 4), (1, 2)], num_queries=5, seed=0)
    keys, queries = Dim('num_keys', min=2), Dim('num_queries', min=2)
    program = torch.export.export(
        OpOnly(),
        inputs,
        dynamic_shapes=({
            1: keys
        }, None, None, {
            1: queries
        }, {
            1: queries
        }))
    torch.onnx.export(
        program,
        dynamo=True,
        input_names=list(INPUT_NAMES),
        opset_version=opset,
        custom_translation_table=translation_table(sampling, opset),
        optimize=False).save(path)
    return require('onnx', 'This test').load(path)


@pytest.mark.parametrize('sampling', ['grid_sample', 'gather'])
def test_translation_matches_reference(tmp_path, compiled_op, sampling):
    onnxruntime = require('onnxruntime', 'This test')
    path = str(tmp_path / f'{sampling}.onnx')
    model = export(path, sampling)
    require('onnx', 'This test').checker.check_model(model, full_check=True)
    node_types = [node.op_type for node in model.graph.node]
    # Standard operators only, no loop whose trip count follows the input.
    assert all(node.domain in ('', 'ai.onnx') for node in model.graph.node)
    assert 'Loop' not in node_types and 'Scan' not in node_types
    if sampling == 'grid_sample':
        assert node_types.count('GridSample') == 3  # one per level
    else:
        assert 'GridSample' not in node_types
    session = onnxruntime.InferenceSession(
        path, providers=['CPUExecutionProvider'])
    names = [node.name for node in session.get_inputs()]
    # Another level layout (4 levels would change the graph; 3 do not)
    # and query count than the export's.
    for level_shapes, num_queries in (([(6, 7),
                                        (3, 4), (1, 2)], 5), ([(9, 5), (5, 3),
                                                               (2, 2)], 7)):
        inputs = op_inputs(level_shapes, num_queries, seed=num_queries)
        output, = session.run(None, {
            name: tensor.numpy()
            for name, tensor in zip(names, inputs)
        })
        torch.testing.assert_close(
            torch.from_numpy(output),
            ms_deform_attn_reference(*inputs),
            atol=1e-5,
            rtol=1e-5)


def test_grid_sample_needs_opset_16():
    with pytest.raises(ValueError, match='opset >= 16.*gather'):
        grid_sample_translation(MIN_GRID_SAMPLE_OPSET - 1)
    with pytest.raises(ValueError, match='sampling must be one of'):
        translation_table('bilinear', 18)


def test_tensorrt_plugin_node_has_the_plugins_layout(tmp_path, compiled_op):
    # TensorRT's MultiscaleDeformableAttnPlugin_TRT cannot run here: the
    # node's structure is what is checked.
    path = str(tmp_path / 'trt_plugin.onnx')
    model = export(path, 'trt_plugin')
    check_onnx_file(path)
    assert {(opset.domain, opset.version)
            for opset in model.opset_import} >= {(TENSORRT_PLUGIN_DOMAIN, 1)}
    producers = {
        output: node
        for node in model.graph.node
        for output in node.output
    }
    plugins = [
        node for node in model.graph.node
        if node.op_type == TENSORRT_PLUGIN_NAME
    ]
    assert len(plugins) == 1
    plugin, = plugins
    assert plugin.domain == TENSORRT_PLUGIN_DOMAIN
    assert len(plugin.input) == 5 and len(plugin.output) == 1
    assert not plugin.attribute
    # Features, locations and weights go in as the op has them (the
    # plugin's layout is the op's) ...
    assert [plugin.input[index] for index in (0, 3, 4)
            ] == [INPUT_NAMES[index] for index in (0, 3, 4)]
    # ... level sizes and starts as int32 ...
    for index in (1, 2):
        cast = producers[plugin.input[index]]
        assert cast.op_type == 'Cast'
        assert list(cast.input) == [INPUT_NAMES[index]]
        assert cast.attribute[0].i == INT32
    # ... and (bs, num_queries, num_heads, head_dims) comes out, joined to
    # the op's (bs, num_queries, num_heads * head_dims).
    reshape, = [
        node for node in model.graph.node if plugin.output[0] in node.input
    ]
    assert reshape.op_type == 'Reshape'
    shape = producers[reshape.input[1]]
    assert shape.op_type == 'Constant'
    assert list(shape.attribute[0].ints) == [0, 0, NUM_HEADS * HEAD_DIMS]
    with pytest.raises(RuntimeError, match='only TensorRT runs'):
        OnnxRuntimeDetector(path)
