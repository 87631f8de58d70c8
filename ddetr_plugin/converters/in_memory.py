"""MMDetection weights loaded straight into the plugin's model.

A user with an mmdet 3.x Deformable DETR checkpoint can pass it as
``load_from``, to ``--resume`` or to a test tool without running the
converter: the plugin's detector recognises mmdet's layout when weights are
loaded into it and renames them in memory (:func:`convert_for_model`), then
requires them to fit exactly, as the converter does. Resuming also needs the
optimizer's state in the plugin's parameter order
(:func:`reorder_optimizer_state`).

Renaming follows the converter's rules (``convert_mmdet_state_dict``), but
only where the model asks for the new name: a model built from mmdet's own
config keeps mmdet's ``ChannelMapper`` neck, whose keys stay as they are.

Weights of the official repository still go through its converter, which
needs the variant and the class remapping.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn
from torch.optim import Optimizer

from .layouts import conversion_hint, foreign_layout
from .mmdet import CheckpointMismatchError, _rename, check_state_dict


def _num_backbone_levels(keys) -> int:
    """How many ``neck.convs`` mmdet's ChannelMapper has."""
    return len({
        match.group(1)
        for match in (re.match(r'^neck\.convs\.(\d+)\.', key) for key in keys)
        if match
    })


def rename_for_model(keys, model_keys) -> Dict[str, str]:
    """mmdet key -> the model's key, for every key of an mmdet state dict.

    Args:
        keys (Iterable[str]): Keys of mmdet's state dict.
        model_keys (Collection[str]): Keys of the target model's state dict.

    Returns:
        dict[str, str]: The name each mmdet key takes in the model: the
        plugin's name when the model has it, else the unchanged name.
    """
    keys = list(keys)
    levels = _num_backbone_levels(keys)
    names = {}
    for key in keys:
        renamed = _rename(key, levels)
        names[key] = renamed if (renamed in model_keys
                                 or key not in model_keys) else key
    return names


def convert_for_model(
    state_dict: Mapping[str, Tensor],
    model: nn.Module,
    allow_class_change: bool = False
) -> Tuple['OrderedDict[str, Tensor]', List[str]]:
    """mmdet 3.x weights renamed for ``model``, checked to fit it exactly.

    Args:
        state_dict (Mapping[str, Tensor]): mmdet's ``DeformableDETR`` state
            dict (no wrapper prefix).
        model (nn.Module): The plugin's detector.
        allow_class_change (bool): Accept classification layers of another
            class count when nothing else differs (fine-tuning). Defaults
            to False.

    Returns:
        tuple[OrderedDict[str, Tensor], list[str]]: The weights under the
        model's names (neck convolutions the plugin's neck gives a bias and
        mmdet's does not get a zero bias, which computes the same), and the
        classification layers of another shape that were accepted (see
        ``check_state_dict``).

    Raises:
        CheckpointMismatchError: Naming every missing, unexpected or
            misshapen key.
    """
    model_state = model.state_dict()
    names = rename_for_model(state_dict, model_state)
    converted: 'OrderedDict[str, Tensor]' = OrderedDict(
        (names[key], value) for key, value in state_dict.items())
    for key in model_state:
        match = re.match(r'^(neck\.projections\.\d+\.conv\.)bias$', key)
        weight = converted.get(match.group(1) + 'weight') if match else None
        if weight is not None and key not in converted:
            converted[key] = weight.new_zeros(weight.shape[0])
    return converted, check_state_dict(model, converted, allow_class_change)


def convert_in_place(state_dict: Dict[str, Tensor], prefix: str,
                     model: nn.Module) -> Optional[str]:
    """Rename mmdet weights under ``prefix`` of ``state_dict`` for ``model``.

    Called while a state dict is loaded into ``model`` (which sits at
    ``prefix`` of it); other keys are left alone.

    Args:
        state_dict (dict[str, Tensor]): Being loaded; changed in place.
        prefix (str): ``model``'s prefix in it ('' or ``'module.'``).
        model (nn.Module): The plugin's detector.

    Returns:
        str, optional: A one-line description of what was converted, or
        None when the weights were not in mmdet's layout.

    Raises:
        CheckpointMismatchError: For weights in the official layout (which
            need its converter) or mmdet weights that do not fit.
    """
    own = {
        key[len(prefix):]: key
        for key in state_dict if key.startswith(prefix)
    }
    layout = foreign_layout(own)
    if layout is None:
        return None
    if layout != 'mmdet':
        raise CheckpointMismatchError(conversion_hint(layout, None))
    mmdet_state = OrderedDict(
        (key, state_dict.pop(full)) for key, full in own.items())
    try:
        # Classification layers of another class count pass here, as they
        # do for weights in the plugin's layout: MMEngine's loader skips
        # them with a warning. The tools decide beforehand whether that is
        # allowed (load_from) or not (test, --resume); see
        # ``ddetr_plugin.engine.checkpoint_check``.
        converted, class_layers = convert_for_model(
            mmdet_state, model, allow_class_change=True)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            'The weights are in the layout of MMDetection 3.x\'s '
            f'{type(model).__name__}, but do not fit the plugin\'s: {error}'
        ) from None
    state_dict.update(
        (prefix + key, value) for key, value in converted.items())
    message = (
        f'Loaded weights in the layout of MMDetection 3.x\'s '
        f'{type(model).__name__}: {len(mmdet_state)} tensors converted in '
        'memory to the plugin\'s layout and checked to fit the model')
    if class_layers:
        return (message + ', except the classification layers, which have '
                'another number of classes and keep their initial values: ' +
                '; '.join(class_layers))
    return message + ' exactly.'


def _parameter_order(state_keys: List[str], names: Mapping[str, str],
                     model: nn.Module) -> List[str]:
    """The model's parameter names in the order the other model had them.

    A state dict lists each module's parameters, then its buffers, then its
    children's entries, so its parameters appear in ``named_parameters``
    order; shared parameters come once, under their first name.
    """
    parameters = dict(model.named_parameters())
    order, seen = [], set()
    for key in state_keys:
        name = names[key]
        if name in parameters and name not in seen:
            order.append(name)
            seen.add(name)
    return order


def reorder_optimizer_state(optimizer_state: dict, state_keys: List[str],
                            model: nn.Module, optimizer: Optimizer) -> dict:
    """An optimizer state saved with mmdet's model, for the plugin's.

    PyTorch matches saved optimizer states to parameters by position, and
    the two models register the same parameters in different orders; loaded
    as saved, AdamW's moments would land on parameters of other shapes.
    Each saved group is matched by its parameters' names to the group of
    ``optimizer`` holding the same parameters.

    Args:
        optimizer_state (dict): ``optimizer.state_dict()`` of mmdet's run:
            ``state`` (index -> tensors) and ``param_groups`` (each with the
            indices of its ``params``, numbered in mmdet's parameter order).
        state_keys (list[str]): mmdet's state-dict keys, in saved order.
        model (nn.Module): The plugin's detector.
        optimizer (Optimizer): The plugin run's optimizer, built for
            ``model``, which will load the result.

    Returns:
        dict: The state with groups and indices in ``optimizer``'s order.

    Raises:
        CheckpointMismatchError: If the saved groups do not hold the same
            parameters as ``optimizer``'s.
    """
    parameter_names = {
        id(parameter): name
        for name, parameter in model.named_parameters()
    }
    # Tensors an optimizer holds beyond the model's parameters (MMEngine's
    # constructor may add one) keep their order, after the parameters.
    current_names, extras = [], 0
    for group in optimizer.param_groups:
        group_names = []
        for parameter in group['params']:
            name = parameter_names.get(id(parameter))
            if name is None:
                name = f'<tensor {extras} outside the model>'
                extras += 1
            group_names.append(name)
        current_names.append(group_names)
    # The optimizer holds the trainable parameters only (frozen backbone
    # stages are left out), the same ones in both runs of one config.
    optimized = {name for group in current_names for name in group}
    names = rename_for_model(state_keys, model.state_dict())
    saved_order = [
        name for name in _parameter_order(state_keys, names, model)
        if name in optimized
    ] + [f'<tensor {index} outside the model>' for index in range(extras)]
    saved_groups = optimizer_state['param_groups']
    saved_indices = [
        index for group in saved_groups for index in group['params']
    ]
    without_state = sorted(optimized - set(saved_order))
    if without_state or len(saved_indices) != len(saved_order):
        raise CheckpointMismatchError(
            f'the optimizer state holds {len(saved_indices)} tensors, the '
            f'run optimizes {len(optimized)}, {len(without_state)} of which '
            f'the checkpoint\'s weights lack (e.g. {without_state[:3]}): '
            'resume an mmdet run with a config inheriting mmdet\'s (the same '
            'neck and frozen stages, so the same parameters), or start from '
            'its weights with load_from.')
    saved_name = dict(zip(saved_indices, saved_order))
    by_names = {
        frozenset(saved_name[index] for index in group['params']): group
        for group in saved_groups
    }
    state, groups, position = {}, [], 0
    name_to_saved = {name: index for index, name in saved_name.items()}
    for group_names in current_names:
        saved = by_names.get(frozenset(group_names))
        if saved is None:
            raise CheckpointMismatchError(
                'the optimizer state has no parameter group holding exactly '
                f'{group_names[:3]}...: it was saved with other optimizer '
                'settings (paramwise_cfg) than the config\'s.')
        params = []
        for name in group_names:
            saved_index = name_to_saved[name]
            if saved_index in optimizer_state['state']:
                state[position] = optimizer_state['state'][saved_index]
            params.append(position)
            position += 1
        groups.append(dict(saved, params=params))
    return dict(optimizer_state, state=state, param_groups=groups)
