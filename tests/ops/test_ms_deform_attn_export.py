"""``torch.export`` traces the op's front into a single op node.

Deployment exports the detector with ``torch.export``: the front must read
no tensor value while tracing (sizes are symbolic, tensors fake) and leave
one ``ddetr_plugin.ms_deform_attn_forward`` node that its fake kernel
describes.
"""
import torch
from torch import nn

from ddetr_plugin.ops import ms_deform_attn
from testkit import needs_extension

pytestmark = needs_extension


class TinyAttention(nn.Module):
    """Calls the op through its public front, as the detector's layers do.
    """

    def forward(self, value, spatial_shapes, level_start_index, locations,
                weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index,
                              locations, weights)


def test_export_with_dynamic_sizes_gives_one_op_node(random_inputs):
    inputs = tuple(random_inputs(dtype=torch.float32))
    batch = torch.export.Dim('batch', min=1, max=64)
    queries = torch.export.Dim('queries', min=1, max=4096)
    dynamic_shapes = (
        {
            0: batch
        },
        None,
        None,
        {
            0: batch,
            1: queries
        },
        {
            0: batch,
            1: queries
        },
    )
    program = torch.export.export(
        TinyAttention(), inputs, dynamic_shapes=dynamic_shapes)
    targets = [
        node.target for node in program.graph.nodes
        if node.op == 'call_function'
    ]
    op_nodes = [target for target in targets if 'ddetr_plugin' in str(target)]
    assert op_nodes == [torch.ops.ddetr_plugin.ms_deform_attn_forward.default]
    # The exported program runs other sizes than the traced ones.
    bigger = random_inputs(
        batch_size=3, num_queries=5, dtype=torch.float32, seed=1)
    torch.testing.assert_close(program.module()(*bigger),
                               ms_deform_attn(*bigger))
