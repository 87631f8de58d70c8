"""Weights of the official Deformable-DETR release in the plugin's layout.

Checkpoints of the official ConditionalDETR repository are recognised by
their keys and renamed by :mod:`.official_conditional`; the rest of this
module (class remapping, reading the file) serves both.

The official repository (fundamentalvision/Deformable-DETR) saves
``{'model': state_dict, 'optimizer', 'lr_scheduler', 'epoch', 'args'}``,
``args`` being a pickled ``argparse.Namespace``. Conversion goes through
MMDetection 3.3.0's ``DeformableDETR`` layout, which the plugin already maps
from (:func:`ddetr_plugin.converters.mmdet.convert_mmdet_state_dict`).
In the table, ``T.`` stands for ``transformer.``:

======================================  =====================================
official                                mmdet 3.3.0
======================================  =====================================
``backbone.0.body.*``                   ``backbone.*``, plus zero
                                        ``num_batches_tracked`` buffers
``input_proj.{i}.0`` / ``.1``           ``neck.convs.{i}.conv`` / ``.gn``
the last, stride-2 ``input_proj``       ``neck.extra_convs.0.conv`` / ``.gn``
``T.level_embed``                       ``level_embed``
``T.encoder.layers.{i}.self_attn``      ``encoder.layers.{i}.self_attn``
``T.*coder.layers.{i}.linear1``, ``2``  ``*coder.layers.{i}.ffn.layers.0.0``,
                                        ``ffn.layers.1``
``T.encoder.layers.{i}.norm1``, ``2``   ``encoder.layers.{i}.norms.0``, ``1``
``T.decoder.layers.{i}.self_attn``      ``decoder.layers.{i}.self_attn.attn``
``T.decoder.layers.{i}.cross_attn``     ``decoder.layers.{i}.cross_attn``
``T.decoder.layers.{i}.norm2, 1, 3``    ``decoder.layers.{i}.norms.0, 1, 2``
``T.reference_points``                  ``reference_points_fc``
``T.enc_output``, ``T.enc_output_norm`` ``memory_trans_fc``, ``_norm``
``T.pos_trans``, ``T.pos_trans_norm``   ``pos_trans_fc``, ``pos_trans_norm``
``query_embed``                         ``query_embedding``
``class_embed.{i}``                     ``bbox_head.cls_branches.{i}``
``bbox_embed.{i}.layers.{k}``           ``bbox_head.reg_branches.{i}.{2k}``
``T.decoder.{bbox,class}_embed.*``      dropped (aliases of the two above)
======================================  =====================================

The decoder's norms are renamed by position: the official layer applies
``norm2`` after self-attention and ``norm1`` after cross-attention.

Classes: the official COCO classifier has 91 outputs, output ``k`` being
COCO category id ``k`` (id 0 and ten other ids are never used). The
converted classifier keeps the rows of the 80 used ids, in id order, which
is MMDetection's COCO class order. The two-stage model's encoder classifier
(the last ``class_embed``) is trained class-agnostically on output 0, which
ranks the proposals; its row 0 is kept in place.

The convolutions of ``input_proj`` have biases; mmdet's ChannelMapper has
none unless built with ``bias=True``, so the mmdet-layout result loads into
an mmdet model whose neck sets ``bias=True``. The plugin's neck has them.
"""
import argparse
import os.path as osp
import re
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..utils.checkpoint import (UntrustedCheckpointError,
                                check_checkpoint_format, load_checkpoint_file)
from .layouts import detector_of
from .official_conditional import rename_official_conditional

VARIANTS = ('plain', 'refine', 'two-stage')

# COCO category ids of the 80 classes, in MMDetection's class order.
COCO_CATEGORY_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18,
                     19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35,
                     36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50,
                     51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
                     65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82,
                     84, 85, 86, 87, 88, 89, 90)

# (official pattern, mmdet replacement), tried in order.
_RENAMES = (
    (r'^backbone\.0\.body\.', 'backbone.'),
    (r'^transformer\.level_embed$', 'level_embed'),
    (r'^transformer\.encoder\.layers\.(\d+)\.self_attn\.',
     r'encoder.layers.\1.self_attn.'),
    (r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.linear1\.',
     r'\1.layers.\2.ffn.layers.0.0.'),
    (r'^transformer\.(encoder|decoder)\.layers\.(\d+)\.linear2\.',
     r'\1.layers.\2.ffn.layers.1.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.norm1\.',
     r'encoder.layers.\1.norms.0.'),
    (r'^transformer\.encoder\.layers\.(\d+)\.norm2\.',
     r'encoder.layers.\1.norms.1.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.self_attn\.',
     r'decoder.layers.\1.self_attn.attn.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.cross_attn\.',
     r'decoder.layers.\1.cross_attn.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm2\.',
     r'decoder.layers.\1.norms.0.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm1\.',
     r'decoder.layers.\1.norms.1.'),
    (r'^transformer\.decoder\.layers\.(\d+)\.norm3\.',
     r'decoder.layers.\1.norms.2.'),
    (r'^transformer\.reference_points\.', 'reference_points_fc.'),
    (r'^transformer\.enc_output\.', 'memory_trans_fc.'),
    (r'^transformer\.enc_output_norm\.', 'memory_trans_norm.'),
    (r'^transformer\.pos_trans\.', 'pos_trans_fc.'),
    (r'^transformer\.pos_trans_norm\.', 'pos_trans_norm.'),
    (r'^query_embed\.', 'query_embedding.'),
    (r'^class_embed\.(\d+)\.', r'bbox_head.cls_branches.\1.'),
)
# The refinement and two-stage models alias their prediction branches into
# the decoder; the same tensors are saved under ``class_embed``/``bbox_embed``.
_ALIASES = re.compile(r'^transformer\.decoder\.(bbox_embed|class_embed)\.')
_BATCH_NORM_RUNNING_VAR = re.compile(
    r'^backbone\.(.*\.)?(bn\d|downsample\.1)\.running_var$')


class OfficialCheckpointError(ValueError):
    """An official checkpoint cannot be read or converted."""


def load_official_checkpoint(path: str, trusted: bool = False) -> dict:
    """Read an official Deformable-DETR checkpoint file.

    The file holds a pickled ``argparse.Namespace``. Only that class is
    allowed beyond what PyTorch's weights-only loader accepts, so a
    tampered file cannot run code. ``trusted=True`` unpickles the file in
    full; use it only for files you trust (a pickle can run arbitrary code),
    e.g. a checkpoint holding other objects.

    Args:
        path (str): The ``.pth`` file.
        trusted (bool): Unpickle everything. Defaults to False.

    Returns:
        dict: The checkpoint.

    Raises:
        NotACheckpointError: The file is not a ``torch.save`` file or is
            damaged (truncated download).
        OfficialCheckpointError: It holds other objects and is not trusted.
    """
    if not osp.isfile(path):
        raise FileNotFoundError(f'official checkpoint {path!r} does not '
                                'exist')
    if trusted:
        # A damaged file gets the same NotACheckpointError as elsewhere.
        check_checkpoint_format(path)
        return torch.load(path, map_location='cpu', weights_only=False)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load_checkpoint_file(path, map_location='cpu')
    except UntrustedCheckpointError as error:
        raise OfficialCheckpointError(
            f'{path!r} holds objects other than tensors, plain containers '
            'and argparse.Namespace, so it was not unpickled (PyTorch said: '
            f'{str(error.__cause__ or error).splitlines()[0]}). If you trust '
            'the file, pass --trust-pickle (or trusted=True) to load it in '
            'full.') from error


def official_state_dict(checkpoint: Mapping) -> Mapping[str, Tensor]:
    """The model weights of an official checkpoint or state dict."""
    if not isinstance(checkpoint, Mapping):
        raise OfficialCheckpointError(
            'expected an official checkpoint (a dict with a "model" entry) '
            f'or its state dict, got {type(checkpoint).__name__}')
    state_dict = checkpoint.get('model', checkpoint)
    if not any(key.startswith('transformer.') for key in state_dict):
        raise OfficialCheckpointError(
            'this is not an official Deformable-DETR or ConditionalDETR '
            'state dict: no '
            '"transformer.*" keys; first keys: '
            f'{list(state_dict)[:5]}')
    return state_dict


def detect_variant(state_dict: Mapping[str, Tensor]) -> str:
    """``'plain'``, ``'refine'`` or ``'two-stage'`` from the official keys
    (of a Deformable-DETR checkpoint; ConditionalDETR has no variants).

    Two-stage models have ``transformer.enc_output``; refinement gives
    every decoder layer its own branches, which the official code aliases
    into the decoder, and failing that the branches differ.
    """
    if 'transformer.enc_output.weight' in state_dict:
        return 'two-stage'
    if any(_ALIASES.match(key) for key in state_dict):
        return 'refine'
    first = state_dict.get('class_embed.0.weight')
    second = state_dict.get('class_embed.1.weight')
    if first is not None and second is not None and not torch.equal(
            first, second):
        return 'refine'
    return 'plain'


def _neck_key(key: str, num_input_levels: int) -> Optional[str]:
    """mmdet name of an ``input_proj`` key, or None if not one."""
    match = re.match(r'^input_proj\.(\d+)\.([01])\.(weight|bias)$', key)
    if match is None:
        return None
    level, part, name = int(match.group(1)), match.group(2), match.group(3)
    module = 'conv' if part == '0' else 'gn'
    if level < num_input_levels:
        return f'neck.convs.{level}.{module}.{name}'
    return f'neck.extra_convs.{level - num_input_levels}.{module}.{name}'


def _num_input_levels(state_dict: Mapping[str, Tensor]) -> int:
    """Projections reading backbone levels: the 1x1 convolutions."""
    levels = 0
    while f'input_proj.{levels}.0.weight' in state_dict and state_dict[
            f'input_proj.{levels}.0.weight'].shape[-1] == 1:
        levels += 1
    return levels


def _class_rows(weight: Tensor, rows: Sequence[int], key: str) -> Tensor:
    if weight.shape[0] <= max(rows):
        raise OfficialCheckpointError(
            f'{key} has {weight.shape[0]} class outputs, but the class '
            f'remapping reads output {max(rows)}; the official COCO '
            'checkpoints have 91 (pass category_ids=None to keep the '
            'classifier as it is)')
    return weight[list(rows)].clone()


def official_to_mmdet_state_dict(
    checkpoint: Mapping,
    category_ids: Optional[Sequence[int]] = COCO_CATEGORY_IDS
) -> 'OrderedDict[str, Tensor]':
    """Map official weights to MMDetection 3.3.0's DeformableDETR names, or
    ConditionalDETR's for a checkpoint of the official ConditionalDETR.

    Args:
        checkpoint (Mapping): The official checkpoint (with ``model``) or
            its state dict.
        category_ids (Sequence[int], optional): Official classifier output
            of each converted class, in the converted class order. Defaults
            to the 80 COCO category ids (mmdet's COCO classes); None keeps
            the classifier unchanged.

    Returns:
        OrderedDict[str, Tensor]: Weights in mmdet's layout (neck
        convolutions with biases).
    """
    state_dict = official_state_dict(checkpoint)
    if detector_of(state_dict) == 'ConditionalDETR':
        converted, unknown = rename_official_conditional(
            state_dict, category_ids, _class_rows)
        if unknown:
            raise OfficialCheckpointError(
                'official keys with no known mmdet name (is this an '
                f'official ConditionalDETR checkpoint?): {unknown}')
        return _add_batch_counts(converted)
    variant = detect_variant(state_dict)
    num_input_levels = _num_input_levels(state_dict)
    class_branches = {
        int(match.group(1))
        for match in (re.match(r'^class_embed\.(\d+)\.', key)
                      for key in state_dict) if match
    }
    encoder_branch = (
        max(class_branches)
        if variant == 'two-stage' and class_branches else None)

    converted: 'OrderedDict[str, Tensor]' = OrderedDict()
    unknown = []
    for key, value in state_dict.items():
        if _ALIASES.match(key):
            continue
        new_key = _neck_key(key, num_input_levels)
        if new_key is None:
            match = re.match(r'^bbox_embed\.(\d+)\.layers\.(\d+)\.(.*)$', key)
            if match:
                # The official MLP holds only its Linear layers; mmdet's
                # Sequential interleaves ReLUs.
                new_key = (f'bbox_head.reg_branches.{match.group(1)}.'
                           f'{2 * int(match.group(2))}.{match.group(3)}')
        if new_key is None:
            for pattern, replacement in _RENAMES:
                renamed, count = re.subn(pattern, replacement, key)
                if count:
                    new_key = renamed
                    break
        if new_key is None:
            unknown.append(key)
            continue
        class_match = re.match(r'^class_embed\.(\d+)\.', key)
        if class_match and category_ids is not None:
            rows = list(category_ids)
            if int(class_match.group(1)) == encoder_branch:
                # Output 0 is the proposal score ("object").
                rows[0] = 0
            value = _class_rows(value, rows, key)
        converted[new_key] = value
    if unknown:
        raise OfficialCheckpointError(
            'official keys with no known mmdet name (is this an official '
            f'Deformable-DETR R50 checkpoint?): {unknown}')

    return _add_batch_counts(converted)


def _add_batch_counts(
        converted: 'OrderedDict[str, Tensor]') -> 'OrderedDict[str, Tensor]':
    """Zero ``num_batches_tracked`` for every backbone batch norm.

    The official backbones use frozen batch norm, which keeps no batch
    count; mmdet's BatchNorm2d has one (unused in eval mode).
    """
    for key in [k for k in converted if _BATCH_NORM_RUNNING_VAR.match(k)]:
        count_key = key[:-len('running_var')] + 'num_batches_tracked'
        converted.setdefault(count_key, torch.tensor(0, dtype=torch.long))
    return converted


def convert_official_state_dict(
        checkpoint: Mapping,
        category_ids: Optional[Sequence[int]] = COCO_CATEGORY_IDS,
        variant: Optional[str] = None) -> 'OrderedDict[str, Tensor]':
    """Map official weights to the plugin's ``DeformableDETR`` layout.

    Args:
        checkpoint (Mapping): The official checkpoint (with ``model``) or
            its state dict.
        category_ids (Sequence[int], optional): See
            :func:`official_to_mmdet_state_dict`.
        variant (str, optional): ``'plain'``, ``'refine'`` or
            ``'two-stage'``: checked against the checkpoint, whose weights
            only fit a model of the same variant. None skips the check.

    Returns:
        OrderedDict[str, Tensor]: The plugin's state dict.
    """
    from .mmdet import convert_mmdet_state_dict
    state_dict = official_state_dict(checkpoint)
    if variant is not None:
        check_variant(state_dict, variant)
    return convert_mmdet_state_dict(
        official_to_mmdet_state_dict(state_dict, category_ids))


def check_variant(state_dict: Mapping[str, Tensor], variant: str) -> None:
    """Raise unless the official weights are of ``variant``."""
    if variant not in VARIANTS:
        raise ValueError(f'variant must be one of {VARIANTS}, got '
                         f'{variant!r}')
    found = detect_variant(state_dict)
    if found != variant:
        raise OfficialCheckpointError(
            f'the checkpoint is a {found!r} Deformable DETR but variant '
            f'{variant!r} was asked for; its weights only fit a {found!r} '
            'model (plain: shared prediction branches; refine: '
            'with_box_refine=True; two-stage: with_box_refine=True and '
            'as_two_stage=True)')


def variant_of_model_config(model_cfg: Mapping) -> str:
    """The official variant a detector config builds.

    Args:
        model_cfg (Mapping): A ``DeformableDETR`` model config, with the
            flags ``with_box_refine`` and ``as_two_stage``.

    Returns:
        str: ``'plain'``, ``'refine'`` or ``'two-stage'``.
    """
    refine = bool(model_cfg.get('with_box_refine', False))
    two_stage = bool(model_cfg.get('as_two_stage', False))
    if two_stage and not refine:
        raise OfficialCheckpointError(
            'the config sets as_two_stage=True with with_box_refine=False; '
            'the official two-stage checkpoints also refine boxes, so set '
            'with_box_refine=True')
    return 'two-stage' if two_stage else 'refine' if refine else 'plain'


def compare_state_dicts(converted: Mapping[str, Tensor],
                        expected: Mapping[str, Tensor]) -> Dict[str, list]:
    """Missing, unexpected and misshapen keys of ``converted``.

    Args:
        converted (Mapping[str, Tensor]): A converted state dict.
        expected (Mapping[str, Tensor]): The target model's state dict.

    Returns:
        dict[str, list]: ``missing`` and ``unexpected`` key lists and
        ``shape`` (key, expected shape, converted shape) tuples; all empty
        when the state dict fits.
    """
    return dict(
        missing=sorted(set(expected) - set(converted)),
        unexpected=sorted(set(converted) - set(expected)),
        shape=[(key, tuple(expected[key].shape), tuple(converted[key].shape))
               for key in sorted(set(expected) & set(converted))
               if expected[key].shape != converted[key].shape])
