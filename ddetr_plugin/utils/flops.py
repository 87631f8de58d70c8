"""FLOPs of the attention operators MMEngine's counter does not know.

MMEngine's ``FlopAnalyzer`` (behind ``get_model_complexity_info`` and so
behind mmdet's ``tools/analysis_tools/get_flops.py``) traces the model and
counts only the operators it has a formula for. Two that the plugin's
detectors run were skipped, each with an "Unsupported operator" warning:

- the compiled ``ddetr_plugin::ms_deform_attn_forward`` (Deformable DETR's
  encoder and decoder attention);
- ``aten::scaled_dot_product_attention``, the fused dense attention of
  ``nn.MultiheadAttention`` and of Conditional DETR's attention (its
  encoder and every decoder attention).

The formulas follow MMEngine's conventions (one multiply-add is one flop;
element-wise work such as the softmax is not counted;
``aten::grid_sampler`` counts 4 per output element for the bilinear
interpolation).

Deformable attention: each query gathers, per head,
``num_levels * num_points`` samples of a ``head_dims`` vector, each costing
4 (bilinear interpolation of 4 neighbours) plus 1 (scaling by its
attention weight and summing)::

    flops = bs * num_queries * num_heads * num_levels * num_points
            * head_dims * 5

Dense attention is the two matrix products ``aten::matmul`` would be
counted for: the scores ``query @ key^T`` and the weighted sum
``weights @ value``, per head::

    flops = bs * num_heads * num_queries * num_keys
            * (query_head_dims + value_head_dims)
"""
import math
from typing import Any, List

# Operator names in a TorchScript trace: the plugin's op, torch's fused
# dense attention.
OP_NAME = 'ddetr_plugin::ms_deform_attn_forward'
DENSE_ATTENTION_OP_NAME = 'aten::scaled_dot_product_attention'
# Per sampled channel: 4 bilinear multiply-adds and 1 weighted sum.
FLOPS_PER_SAMPLE_CHANNEL = 5


def ms_deform_attn_flops(batch_size: int, num_queries: int, num_heads: int,
                         num_levels: int, num_points: int,
                         head_dims: int) -> int:
    """FLOPs of one call of the op.

    Args:
        batch_size (int): bs.
        num_queries (int): Queries (the flattened keys in the encoder).
        num_heads (int): Attention heads.
        num_levels (int): Feature levels.
        num_points (int): Sampling points per head and level.
        head_dims (int): Channels per head.

    Returns:
        int: Multiply-adds of the sampling and the weighted sum.
    """
    return (batch_size * num_queries * num_heads * num_levels * num_points *
            head_dims * FLOPS_PER_SAMPLE_CHANNEL)


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """MMEngine handle: FLOPs of a traced ``ms_deform_attn_forward`` call.

    Args:
        inputs (list): The traced inputs: value (bs, num_keys, num_heads,
            head_dims), spatial_shapes, level_start_index,
            sampling_locations (bs, num_queries, num_heads, num_levels,
            num_points, 2), attention_weights.
        outputs (list): The traced output (bs, num_queries,
            num_heads * head_dims).

    Returns:
        int: The op's FLOPs.
    """
    from mmengine.analysis.jit_handles import get_shape
    head_dims = get_shape(inputs[0])[3]
    batch_size, num_queries, num_heads, num_levels, num_points, _ = (
        get_shape(inputs[3]))
    return ms_deform_attn_flops(batch_size, num_queries, num_heads, num_levels,
                                num_points, head_dims)


def dense_attention_flops(batch_size: int, num_heads: int, num_queries: int,
                          num_keys: int, query_head_dims: int,
                          value_head_dims: int) -> int:
    """FLOPs of one scaled dot-product attention call.

    Args:
        batch_size (int): bs.
        num_heads (int): Attention heads.
        num_queries (int): Queries.
        num_keys (int): Keys (and values).
        query_head_dims (int): Channels per head of queries and keys.
        value_head_dims (int): Channels per head of values.

    Returns:
        int: Multiply-adds of the scores and of the weighted sum.
    """
    return (batch_size * num_heads * num_queries * num_keys *
            (query_head_dims + value_head_dims))


def dense_attention_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """MMEngine handle: FLOPs of a traced ``scaled_dot_product_attention``.

    Args:
        inputs (list): The traced inputs: query (..., num_queries,
            query_head_dims), key (..., num_keys, query_head_dims), value
            (..., num_keys, value_head_dims), then the mask, dropout and
            flags, which change no multiply-add. The leading axes (bs,
            num_heads) are the query's.
        outputs (list): The traced output (..., num_queries,
            value_head_dims).

    Returns:
        int: The call's FLOPs.
    """
    from mmengine.analysis.jit_handles import get_shape
    query_shape = get_shape(inputs[0])
    num_keys = get_shape(inputs[1])[-2]
    value_head_dims = get_shape(inputs[2])[-1]
    *leading, num_queries, query_head_dims = query_shape
    # (bs, num_heads) counted as one axis: the formula is linear in both.
    return dense_attention_flops(
        math.prod(leading), 1, num_queries, num_keys, query_head_dims,
        value_head_dims)


def register_flop_counter() -> None:
    """Add the formulas to the handles every new ``FlopAnalyzer`` and
    ``ActivationAnalyzer`` (and so ``get_model_complexity_info``) starts
    from. Safe to call again.

    The activation count is MMEngine's rule for every op: the elements of
    the output, (bs, num_queries, num_heads * head_dims) for the plugin's
    op; without a handle the activation counter warns that the op is
    unsupported.
    """
    from mmengine.analysis import complexity_analysis
    from mmengine.analysis.jit_handles import generic_activation_jit
    for name, flop_handle in ((OP_NAME, ms_deform_attn_flop_jit),
                              (DENSE_ATTENTION_OP_NAME,
                               dense_attention_flop_jit)):
        complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[name] = flop_handle
        complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS[name] = (
            generic_activation_jit())
