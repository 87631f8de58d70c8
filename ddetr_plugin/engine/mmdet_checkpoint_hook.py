"""Resuming an MMDetection run with the plugin's model.

An mmdet 3.x Deformable DETR checkpoint holds the model's weights and the
optimizer's state, both in mmdet's layout. The detector renames the weights
whenever they are loaded into it, but the optimizer state is matched to
parameters by position, and the plugin registers its parameters in another
order; resumed as saved, AdamW's moments would meet parameters of other
shapes at the first step. :class:`MmdetCheckpointHook` converts both in
memory as soon as the runner has read the checkpoint, before anything is
loaded. ``tools/train.py`` and ``tools/test.py`` add it to every run.
"""
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch.optim import Optimizer

from ..converters.in_memory import convert_for_model, reorder_optimizer_state
from ..converters.layouts import foreign_layout
from ..converters.mmdet import CheckpointMismatchError
from ..registry import HOOKS


def _without_wrapper_prefix(state_dict: dict) -> dict:
    if state_dict and all(key.startswith('module.') for key in state_dict):
        return {
            key[len('module.'):]: value
            for key, value in state_dict.items()
        }
    return state_dict


@HOOKS.register_module()
class MmdetCheckpointHook(Hook):
    """Convert a loaded mmdet checkpoint (weights and optimizer state) in
    memory; checkpoints in the plugin's layout pass untouched."""

    priority = 'VERY_HIGH'

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """Rename mmdet weights and reorder the optimizer state in place.

        Args:
            runner (Runner): The runner; its model is the plugin's detector.
            checkpoint (dict): As read from the file, about to be loaded.

        Raises:
            CheckpointMismatchError: If the weights or the optimizer state
                do not fit the model exactly once converted.
        """
        state = checkpoint.get('state_dict')
        if not isinstance(state, dict):
            return
        state = _without_wrapper_prefix(state)
        if foreign_layout(state) != 'mmdet':
            return
        model = runner.model.module if is_model_wrapper(
            runner.model) else runner.model
        # Only a resumed run loads the optimizer state (MMEngine keeps the
        # flag private); only a training run has built its optimizer.
        resuming = getattr(runner, '_resume', False)
        try:
            # load_from may bring another class count (fine-tuning): those
            # layers keep their initial values, as tools/train.py warns.
            checkpoint['state_dict'], class_layers = convert_for_model(
                state, model, allow_class_change=not resuming)
        except CheckpointMismatchError as error:
            raise CheckpointMismatchError(
                'The checkpoint is in the layout of MMDetection 3.x\'s '
                f'{type(model).__name__}, but does not fit the model of the '
                f'config: {error}') from None
        converted = 'weights'
        optimizer_state = checkpoint.get('optimizer')
        optim_wrapper = getattr(runner, 'optim_wrapper', None)
        optimizer = getattr(optim_wrapper, 'optimizer', None)
        if resuming and isinstance(optimizer_state, dict) and isinstance(
                optimizer, Optimizer):
            checkpoint['optimizer'] = reorder_optimizer_state(
                optimizer_state, list(state), model, optimizer)
            converted = 'weights and optimizer state'
        fit = ('exactly' if not class_layers else
               'except the classification layers, which have another '
               'number of classes and keep their initial values: ' +
               '; '.join(class_layers))
        runner.logger.info(
            'Loaded a checkpoint in the layout of MMDetection 3.x\'s '
            f'{type(model).__name__}: {converted} converted in memory to the '
            f'plugin\'s layout and checked to fit the model {fit}.')
