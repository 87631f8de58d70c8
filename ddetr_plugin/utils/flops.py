"""FLOPs of the multi-scale deformable attention op, for MMEngine's counter.

MMEngine's ``FlopAnalyzer`` (behind ``get_model_complexity_info`` and so
behind mmdet's ``tools/analysis_tools/get_flops.py``) traces the model and
counts only the operators it has a formula for; the compiled
``ddetr_plugin::ms_deform_attn_forward`` op was skipped, so the count left
out the attention of every encoder and decoder layer.

The formula follows MMEngine's conventions (one multiply-add is one flop;
``aten::grid_sampler`` counts 4 per output element for the bilinear
interpolation): each query gathers, per head, ``num_levels * num_points``
samples of a ``head_dims`` vector, each costing 4 (bilinear interpolation
of 4 neighbours) plus 1 (scaling by its attention weight and summing)::

    flops = bs * num_queries * num_heads * num_levels * num_points
            * head_dims * 5
"""
from typing import Any, List

# Operator name in a TorchScript trace of the plugin's op.
OP_NAME = 'ddetr_plugin::ms_deform_attn_forward'
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


def register_flop_counter() -> None:
    """Add the op's formulas to the handles every new ``FlopAnalyzer`` and
    ``ActivationAnalyzer`` (and so ``get_model_complexity_info``) starts
    from. Safe to call again.

    The activation count is MMEngine's rule for every op: the elements of
    the output, (bs, num_queries, num_heads * head_dims); without a handle
    the activation counter warns that the op is unsupported.
    """
    from mmengine.analysis import complexity_analysis
    from mmengine.analysis.jit_handles import generic_activation_jit
    complexity_analysis._DEFAULT_SUPPORTED_FLOP_OPS[OP_NAME] = (
        ms_deform_attn_flop_jit)
    complexity_analysis._DEFAULT_SUPPORTED_ACT_OPS[OP_NAME] = (
        generic_activation_jit())
