"""What the plugin's op adds to mmdet's models under mmcv's attention.

With ``ddetr_plugin.mmcv_msda`` on, mmdet's DINO (built from mmdet 3.3.0's
config at test size, ``mmcv_msda_cases.py``):

- trains under ``torch.use_deterministic_algorithms(True)`` with bitwise
  equal losses and gradients from run to run (on CUDA, mmcv's kernel sums
  the value gradient with atomic adds);
- goes through ``torch.compile`` with every attention call as one node of
  the graph (``ddetr_plugin::ms_deform_attn_forward``) and no graph break
  at the attention: the encoder's layers compile with ``fullgraph=True``
  and compute what eager mode computes, forward and backward. (The whole
  forward is traced too, with graph breaks elsewhere, in mmdet's own code:
  README; tracing it takes over 20 s, too long for the suite.)
"""
import os.path as osp
import runpy
from types import SimpleNamespace

import pytest
import torch

from ddetr_plugin import mmcv_patch

pytest.importorskip('scipy')

OPERATOR = 'ddetr_plugin.ms_deform_attn_forward'

# The helper module beside this file (the tests are no package).
cases = SimpleNamespace(**runpy.run_path(
    osp.join(osp.dirname(osp.abspath(__file__)), 'mmcv_msda_cases.py')))


@pytest.fixture(autouse=True)
def switch_on_for_the_test():
    """The switch on inside each test, mmcv as found after it."""
    with mmcv_patch.enabled():
        yield


@pytest.fixture(scope='module')
def dino():
    return cases.build_model('dino')


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_switched_dino_trains_deterministically(dino, deterministic):
    first_losses, first_gradients = cases.losses_and_gradients(dino)
    second_losses, second_gradients = cases.losses_and_gradients(dino)
    for key, loss in first_losses.items():
        assert torch.equal(loss, second_losses[key]), key
    assert first_gradients.keys() == second_gradients.keys()
    for name, gradient in first_gradients.items():
        assert torch.equal(gradient, second_gradients[name]), name


def _operator_nodes(graphs) -> int:
    """Calls of the plugin's op in traced FX graphs."""
    return sum(
        OPERATOR in str(node.target) for graph in graphs
        for node in graph.graph.nodes if node.op == 'call_function')


def _encoder_inputs(model) -> dict:
    """What DINO's encoder layers take, for the padded batch."""
    data = cases.make_batch(model, training=False)
    with torch.no_grad():
        features = model.extract_feat(data['inputs'])
        inputs, _ = model.pre_transformer(features, data['data_samples'])
        # mmdet computes these from the level sizes' values, which dynamo
        # cannot trace (torch.linspace with a tensor's value as its
        # length): computed here, outside the graph.
        inputs['reference_points'] = (
            model.encoder.get_encoder_reference_points(
                inputs['spatial_shapes'], inputs['valid_ratios'],
                inputs['feat'].device))
    inputs['query'] = inputs.pop('feat')
    inputs['query_pos'] = inputs.pop('feat_pos')
    inputs['key_padding_mask'] = inputs.pop('feat_mask')
    return inputs


def test_encoder_compiles_with_the_op_as_one_node(dino):
    dino.eval()
    inputs = _encoder_inputs(dino)

    def encoder_layers(query, **kwargs):
        """DINO's encoder after its reference points."""
        for layer in dino.encoder.layers:
            query = layer(query=query, **kwargs)
        return query

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(encoder_layers)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert _operator_nodes(explanation.graphs) == len(dino.encoder.layers)

    # Forward and backward through the compiled graph (the op's fake and
    # autograd registrations) give eager mode's numbers.
    results = []
    compiled = torch.compile(
        encoder_layers, fullgraph=True, backend='aot_eager')
    for function in (encoder_layers, compiled):
        query = inputs['query'].detach().clone().requires_grad_()
        memory = function(**dict(inputs, query=query))
        memory.square().mean().backward()
        results.append((memory.detach(), query.grad))
    torch._dynamo.reset()
    for compiled_result, eager_result in zip(results[1], results[0]):
        torch.testing.assert_close(
            compiled_result, eager_result, rtol=1e-5, atol=1e-5)
