"""Weights of the official ConditionalDETR release in mmdet's layout.

The official repository (Atten4Vis/ConditionalDETR) saves
``{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'args'}``
like the official Deformable-DETR (see :mod:`.official`, which reads both
and dispatches here). The model has 564 tensors (R50, 6 + 6 layers);
MMDetection 3.3.0's ``ConditionalDETR`` has the same ones plus 53
``num_batches_tracked`` buffers. Official name -> mmdet name, ``T.``
standing for ``transformer.``:

* ``backbone.0.body.*`` -> ``backbone.*``;
* ``input_proj`` (one 1x1 convolution) -> ``neck.convs.0.conv``;
* ``T.encoder.layers.{i}.self_attn`` -> ``encoder.layers.{i}.self_attn.attn``;
* ``T.{encoder,decoder}.layers.{i}.linear1``, ``linear2`` ->
  ``...ffn.layers.0.0``, ``...ffn.layers.1``;
* ``T.{encoder,decoder}.layers.{i}.norm1``, ``norm2`` (, ``norm3``) ->
  ``...norms.0``, ``...norms.1`` (, ``...norms.2``);
* ``T.decoder.layers.{i}.sa_*_proj``, ``ca_*_proj`` ->
  ``decoder.layers.{i}.self_attn.*_proj``, ``...cross_attn.*_proj``;
  the attentions' ``out_proj`` keep their names;
* ``T.decoder.norm`` -> ``decoder.post_norm``;
  ``T.decoder.query_scale`` and ``ref_point_head`` -> under ``decoder.``;
* ``query_embed`` -> ``query_embedding``;
* ``class_embed`` -> ``bbox_head.fc_cls`` (91 outputs -> the 80 COCO ids);
* ``bbox_embed.layers.{0,1,2}`` -> ``bbox_head.reg_ffn.layers.0.0``,
  ``bbox_head.reg_ffn.layers.1``, ``bbox_head.fc_reg``.

Unlike Deformable-DETR's decoder, the official Conditional DETR layer
applies ``norm1`` after self-attention, ``norm2`` after cross-attention
and ``norm3`` after the feed-forward block, in mmdet's order.
"""
import re
from collections import OrderedDict
from typing import List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

# (official pattern, mmdet replacement), tried in order.
_RENAMES: List[Tuple[str, str]] = [
    (r'^backbone\.0\.body\.', 'backbone.'),
    (r'^input_proj\.', 'neck.convs.0.conv.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.self_attn\.',
     r'encoder.layers.\1.self_attn.attn.'),
    (r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.linear1\.',
     r'\1.layers.\2.ffn.layers.0.0.'),
    (r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.linear2\.',
     r'\1.layers.\2.ffn.layers.1.'),
    (r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.norm1\.',
     r'\1.layers.\2.norms.0.'),
    (r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.norm2\.',
     r'\1.layers.\2.norms.1.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm3\.',
     r'decoder.layers.\1.norms.2.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.sa_(\w+_proj)\.',
     r'decoder.layers.\1.self_attn.\2.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.ca_(\w+_proj)\.',
     r'decoder.layers.\1.cross_attn.\2.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.(self|cross)_attn\.out_proj\.',
     r'decoder.layers.\1.\2_attn.out_proj.'),
    (r'^transformer\.decoder\.norm\.', 'decoder.post_norm.'),
    (r'^transformer\.decoder\.(query_scale|ref_point_head)\.', r'decoder.\1.'),
    (r'^query_embed\.', 'query_embedding.'),
    (r'^class_embed\.', 'bbox_head.fc_cls.'),
    (r'^bbox_embed\.layers\.0\.', 'bbox_head.reg_ffn.layers.0.0.'),
    (r'^bbox_embed\.layers\.1\.', 'bbox_head.reg_ffn.layers.1.'),
    (r'^bbox_embed\.layers\.2\.', 'bbox_head.fc_reg.'),
]


def rename_official_conditional(
    state_dict: Mapping[str, Tensor],
    category_ids: Optional[Sequence[int]],
    select_rows,
) -> Tuple['OrderedDict[str, Tensor]', List[str]]:
    """Official ConditionalDETR weights under mmdet's names.

    Args:
        state_dict (Mapping[str, Tensor]): The official model's weights.
        category_ids (Sequence[int], optional): Classifier outputs kept, in
            the converted class order; None keeps the classifier.
        select_rows (Callable): ``(weight, rows, key) -> weight[rows]``,
            raising a clear error for a classifier that is too small.

    Returns:
        tuple: The renamed weights, and the official keys with no known
        mmdet name.
    """
    converted: 'OrderedDict[str, Tensor]' = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        for pattern, replacement in _RENAMES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                break
        else:
            unknown.append(key)
            continue
        if key.startswith('class_embed.') and category_ids is not None:
            value = select_rows(value, list(category_ids), key)
        converted[new_key] = value
    return converted, unknown
