"""Weights of MMDetection 3.x's Deformable and Conditional DETR in the
plugin's layout.

The models compute the same thing; only module names differ
(mmdet 3.3.0 name -> plugin name):

* ``neck.convs.{i}.conv/gn`` -> ``neck.projections.{i}.conv/norm``, and
  ``neck.extra_convs.{j}`` continue as ``neck.projections.{n + j}``;
* ``encoder.layers.{i}.norms.{0,1}`` ->
  ``transformer.encoder.layers.{i}.{self_attn,ffn}_norm``;
* ``decoder.layers.{i}.norms.{0,1,2}`` ->
  ``transformer.decoder.layers.{i}.{self_attn,cross_attn,ffn}_norm``;
* ``*.ffn.layers.0.0`` and ``*.ffn.layers.1`` -> ``*.ffn.linear1`` and
  ``*.ffn.linear2``;
* ``{encoder,decoder}.layers.{i}.self_attn.attn.*`` (mmcv's wrapper
  around torch's multi-head attention) -> ``...self_attn.*`` (torch's
  directly);
* Conditional DETR's attention projections ``q``/``k``/``v`` ->
  ``query``/``key``/``value`` (``qcontent_proj`` -> ``query_content_proj``,
  ``qpos_sine_proj`` -> ``query_sine_proj``...), its MLPs
  ``decoder.{query_scale,ref_point_head}.layers.{j}`` ->
  ``...{query_scale,ref_point_head}.{2j}``, and its head's ``fc_cls``,
  ``reg_ffn.layers.0.0``, ``reg_ffn.layers.1``, ``fc_reg`` ->
  ``cls_branch``, ``reg_branch.{0,2,4}``;
* the rest of ``encoder.*`` and ``decoder.*``, and ``level_embed``,
  ``query_embedding``, ``reference_points_fc``, ``memory_trans_*``,
  ``pos_trans_*`` -> the same name under ``transformer.``;
* ``backbone.*`` and ``bbox_head.*`` are unchanged.

mmdet's ChannelMapper convolutions have no bias (GroupNorm follows them);
the plugin's neck has the official model's biases, so the converter adds
zero biases, which leaves the computation unchanged.
"""
import re
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor, nn

from .layouts import CONFIG_FOLDERS, detector_of

# Conditional DETR's attention projections, mmdet's short names -> whole
# words.
_PROJECTIONS = dict(
    qcontent='query_content',
    qpos='query_pos',
    kcontent='key_content',
    kpos='key_pos',
    v='value',
    qpos_sine='query_sine')


def _projection(match: 're.Match') -> str:
    return (f'transformer.decoder.layers.{match.group(1)}.{match.group(2)}'
            f'_attn.{_PROJECTIONS[match.group(3)]}_proj.')


def _mlp_layer(match: 're.Match') -> str:
    # mmdet's MLP lists its linear layers; the plugin's nn.Sequential has a
    # ReLU between each two, so linear layer j sits at index 2j.
    return (f'transformer.decoder.{match.group(1)}.'
            f'{2 * int(match.group(2))}.')


# (pattern, replacement) applied in order; the first match wins.
_RENAMES: List[Tuple[str, Union[str, Callable]]] = [
    (r'^neck\.convs\.(\d+)\.gn\.', r'neck.projections.\1.norm.'),
    (r'^neck\.convs\.(\d+)\.conv\.', r'neck.projections.\1.conv.'),
    (r'^(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.0\.0\.',
     r'transformer.\1.layers.\2.ffn.linear1.'),
    (r'^(encoder|decoder)\.layers\.(\d+)\.ffn\.layers\.1\.',
     r'transformer.\1.layers.\2.ffn.linear2.'),
    (r'^encoder\.layers\.(\d+)\.norms\.0\.',
     r'transformer.encoder.layers.\1.self_attn_norm.'),
    (r'^encoder\.layers\.(\d+)\.norms\.1\.',
     r'transformer.encoder.layers.\1.ffn_norm.'),
    (r'^decoder\.layers\.(\d+)\.norms\.0\.',
     r'transformer.decoder.layers.\1.self_attn_norm.'),
    (r'^decoder\.layers\.(\d+)\.norms\.1\.',
     r'transformer.decoder.layers.\1.cross_attn_norm.'),
    (r'^decoder\.layers\.(\d+)\.norms\.2\.',
     r'transformer.decoder.layers.\1.ffn_norm.'),
    (r'^(encoder|decoder)\.layers\.(\d+)\.self_attn\.attn\.',
     r'transformer.\1.layers.\2.self_attn.'),
    (r'^decoder\.layers\.(\d+)\.(self|cross)_attn\.'
     r'(qcontent|qpos|kcontent|kpos|v|qpos_sine)_proj\.', _projection),
    (r'^decoder\.(query_scale|ref_point_head)\.layers\.(\d+)\.', _mlp_layer),
    (r'^bbox_head\.fc_cls\.', 'bbox_head.cls_branch.'),
    (r'^bbox_head\.reg_ffn\.layers\.0\.0\.', 'bbox_head.reg_branch.0.'),
    (r'^bbox_head\.reg_ffn\.layers\.1\.', 'bbox_head.reg_branch.2.'),
    (r'^bbox_head\.fc_reg\.', 'bbox_head.reg_branch.4.'),
    (r'^(encoder|decoder|level_embed|query_embedding|reference_points_fc|'
     r'memory_trans_fc|memory_trans_norm|pos_trans_fc|pos_trans_norm)\b',
     r'transformer.\1'),
]


def _rename(key: str, num_backbone_levels: int) -> str:
    """The plugin's name of one mmdet parameter.

    Args:
        key (str): The mmdet state-dict key.
        num_backbone_levels (int): Number of ``neck.convs``, which is where
            ``neck.extra_convs`` continue the plugin's ``projections``.

    Returns:
        str: The plugin's key (unchanged if no rule applies).
    """
    extra = re.match(r'^neck\.extra_convs\.(\d+)\.(conv|gn)\.(.*)$', key)
    if extra:
        index = num_backbone_levels + int(extra.group(1))
        module = 'norm' if extra.group(2) == 'gn' else 'conv'
        return f'neck.projections.{index}.{module}.{extra.group(3)}'
    for pattern, replacement in _RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return key


def convert_mmdet_state_dict(
        state_dict: Mapping[str, Tensor]) -> 'OrderedDict[str, Tensor]':
    """Map an mmdet 3.3.0 ``DeformableDETR`` or ``ConditionalDETR`` state
    dict to the plugin's.

    Keys that need no renaming (backbone) are kept. A ChannelMapper neck
    with GroupNorm (Deformable DETR's) becomes the plugin's
    ``DeformableDetrNeck``, its convolutions without bias getting zero
    biases; one without norm (Conditional DETR's 1x1 projection) is
    mmdet's ``ChannelMapper`` in the plugin's configs too, and keeps its
    keys. The tensors are shared, not copied.

    Args:
        state_dict (Mapping[str, Tensor]): mmdet's ``model.state_dict()``
            (the ``state_dict`` entry of an mmdet checkpoint).

    Returns:
        OrderedDict[str, Tensor]: The plugin's state dict, for
        :func:`load_converted`.
    """
    num_backbone_levels = len({
        match.group(1)
        for match in (re.match(r'^neck\.convs\.(\d+)\.', key)
                      for key in state_dict) if match
    })
    with_group_norm = any(
        re.match(r'^neck\.convs\.\d+\.gn\.', key) for key in state_dict)
    converted: 'OrderedDict[str, Tensor]' = OrderedDict()
    for key, value in state_dict.items():
        if key.startswith('neck.') and not with_group_norm:
            converted[key] = value
        else:
            converted[_rename(key, num_backbone_levels)] = value
    for key in list(converted):
        match = re.match(r'^(neck\.projections\.\d+\.conv\.)weight$', key)
        if match and match.group(1) + 'bias' not in converted:
            weight = converted[key]
            converted[match.group(1) + 'bias'] = weight.new_zeros(
                weight.shape[0])
    return converted


class CheckpointMismatchError(ValueError):
    """Weights do not fit the model: a converted state dict, or a checkpoint
    given to a tool (see ``ddetr_plugin.engine.checkpoint_check``)."""


def _shape_hint(key: str, expected: torch.Size, received: torch.Size) -> str:
    """A suggestion for a known kind of shape mismatch, or ''."""
    if CLASS_LAYER_KEY.match(key):
        return (f' The checkpoint was trained with {received[0]} classes and '
                f'the model has {expected[0]}: set '
                f'model.bbox_head.num_classes={received[0]} to use the '
                'checkpoint as is; to fine-tune on your classes, give it '
                'as load_from to tools/train.py, which loads all but these '
                'layers.')
    if key.endswith('query_embedding.weight'):
        return (f' Set model.num_queries={received[0]} as in the '
                'checkpoint.')
    if key.endswith('level_embed'):
        # (num_feature_levels, embed_dims): say which of the two differs.
        if received[0] != expected[0]:
            return (f' Set model.num_feature_levels={received[0]} as in the '
                    'checkpoint.')
        return (f' The checkpoint\'s features are {received[1]} channels '
                f'wide and the model\'s {expected[1]}: set the embed_dims of '
                f'the transformer, neck and head to {received[1]} as in the '
                'checkpoint.')
    return ''


# How many problems a mismatch error lists before it only counts them.
MAX_LISTED = 10

# The head's classification layers: their first axis is the number of
# classes, the one thing a fine-tuning run changes on purpose.
CLASS_LAYER_KEY = re.compile(
    r'^bbox_head\.(cls_branches\.\d+|cls_branch)\.(weight|bias)$')


def _first_keys(keys: List[str]) -> str:
    """The first MAX_LISTED keys, and how many more there are."""
    more = len(keys) - MAX_LISTED
    return ', '.join(
        keys[:MAX_LISTED]) + (f', ... ({more} more)' if more > 0 else '')


def check_state_dict(model: nn.Module,
                     state_dict: Mapping[str, Tensor],
                     allow_class_change: bool = False) -> List[str]:
    """Raise unless ``state_dict`` has exactly the model's keys and shapes.

    Args:
        model (nn.Module): The plugin model.
        state_dict (Mapping[str, Tensor]): A converted state dict.
        allow_class_change (bool): Accept a different shape in the head's
            classification layers when nothing else differs (fine-tuning
            on another ``num_classes``). Defaults to False.

    Returns:
        list[str]: The classification layers accepted with another shape,
        as ``'key: (checkpoint shape) vs (model shape)'``; empty unless
        ``allow_class_change``.
    """
    expected: Dict[str, Tensor] = model.state_dict()
    held, built = detector_of(state_dict), detector_of(expected)
    if held and built and held != built:
        raise CheckpointMismatchError(
            f'The checkpoint holds {held} weights but the model is a '
            f'{built}: give a {held} config (configs/'
            f'{CONFIG_FOLDERS[held]}/...) with these weights, or the '
            f'weights of a {built}.')
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    reshaped = [
        key for key in sorted(set(expected) & set(state_dict))
        if expected[key].shape != state_dict[key].shape
    ]
    if (allow_class_change and reshaped and not missing and not unexpected
            and all(CLASS_LAYER_KEY.match(key) for key in reshaped)):
        return [
            f'{key}: {tuple(state_dict[key].shape)} vs '
            f'{tuple(expected[key].shape)}' for key in reshaped
        ]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys (in the model, not in '
                        f'the checkpoint): {_first_keys(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys (in the '
                        'checkpoint, not in the model): '
                        f'{_first_keys(unexpected)}')
    for key in sorted(set(expected) & set(state_dict)):
        want, got = expected[key].shape, state_dict[key].shape
        if want != got:
            problems.append(f'{key}: the model expects shape {tuple(want)}, '
                            f'the checkpoint has {tuple(got)}.' +
                            _shape_hint(key, want, got))
    if problems:
        listed = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            listed.append(f'... and {len(problems) - MAX_LISTED} more')
        raise CheckpointMismatchError(
            'The checkpoint does not fit the model (check that both use the '
            'same variant flags, num_classes, num_queries, '
            'num_feature_levels and embed_dims):\n  ' + '\n  '.join(listed))
    return []


def load_converted(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load a converted state dict strictly, with a readable error.

    Args:
        model (nn.Module): The plugin model.
        state_dict (Mapping[str, Tensor]): From
            :func:`convert_mmdet_state_dict`.

    Raises:
        CheckpointMismatchError: Naming every missing, unexpected or
            misshapen key.
    """
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)


def load_into_config_model(state_dict: Mapping[str, Tensor],
                           config_path: str) -> nn.Module:
    """Build the model of a plugin config and load converted weights into
    it strictly, so a mismatch shows at conversion rather than training.

    Args:
        state_dict (Mapping[str, Tensor]): Weights in the plugin's layout.
        config_path (str): A plugin config file.

    Returns:
        nn.Module: The model, holding the weights.

    Raises:
        CheckpointMismatchError: Naming every missing, unexpected or
            misshapen key.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from ddetr_plugin.registry import MODELS
    config = Config.fromfile(config_path)
    init_default_scope(config.get('default_scope', 'ddetr_plugin'))
    model_cfg = config.model
    # The weights are about to be replaced: no pretrained download.
    model_cfg.backbone.init_cfg = None
    model = MODELS.build(model_cfg)
    load_converted(model, state_dict)
    return model


def save_converted(state_dict: Mapping[str, Tensor], path: str,
                   **meta) -> None:
    """Write converted weights as an MMEngine-style checkpoint.

    Args:
        state_dict (Mapping[str, Tensor]): Weights in the plugin's layout.
        path (str): Output file.
        **meta: Plain values recorded under ``meta`` (source, variant...).
    """
    torch.save(dict(state_dict=dict(state_dict), meta=meta), path)
