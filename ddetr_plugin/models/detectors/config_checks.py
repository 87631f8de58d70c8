"""Checks of the detector's config values, and mmdet's layout of them.

``--cfg-options model.num_queries=abc`` hands the detector the string
``'abc'``; unchecked, it fails much later with ``'<' not supported between
'int' and 'str'``. These checks name the key, the expected type and what
came, before anything is built.
"""
from typing import Optional


def _received(value) -> str:
    return f'{value!r} ({type(value).__name__})'


def check_positive_int(key: str, value) -> None:
    """Raise a TypeError/ValueError unless ``value`` is an int >= 1.

    Args:
        key (str): Config key, e.g. ``'model.num_queries'``.
        value: The configured value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{key} must be a positive int, got '
                        f'{_received(value)}; set e.g. {key}=300 in the '
                        'config or with --cfg-options.')
    if value < 1:
        raise ValueError(f'{key} must be a positive int, got {value}.')


def check_flag(key: str, value) -> None:
    """Raise a TypeError unless ``value`` is a bool.

    Args:
        key (str): Config key, e.g. ``'model.as_two_stage'``.
        value: The configured value.
    """
    if not isinstance(value, bool):
        raise TypeError(f'{key} must be True or False, got '
                        f'{_received(value)}; with --cfg-options write '
                        f'{key}=True or {key}=False.')


def transformer_config(transformer: Optional[dict],
                       encoder: Optional[dict],
                       decoder: Optional[dict],
                       positional_encoding: Optional[dict],
                       transformer_type: str = 'DeformableDetrTransformer',
                       detector: str = 'DeformableDETR') -> dict:
    """The transformer config, from the plugin's layout or mmdet's.

    The plugin's configs give one ``transformer`` dict; mmdet 3.3.0's give
    ``encoder``, ``decoder`` and ``positional_encoding`` at the top of the
    model, with the same contents (mmdet's ``batch_first=True``,
    ``return_intermediate=True`` and ``post_norm_cfg=None`` are accepted by
    the plugin's layers).

    Args:
        transformer (dict, optional): The plugin's transformer config.
        encoder (dict, optional): mmdet's encoder config.
        decoder (dict, optional): mmdet's decoder config.
        positional_encoding (dict, optional): mmdet's positional encoding.
        transformer_type (str): The plugin's transformer class built from
            mmdet's layout. Defaults to ``'DeformableDetrTransformer'``.
        detector (str): The detector's name, for the messages. Defaults to
            ``'DeformableDETR'``.

    Returns:
        dict: A ``transformer_type`` config.

    Raises:
        ValueError: If both layouts or neither are given.
    """
    mmdet_style = dict(
        encoder=encoder,
        decoder=decoder,
        positional_encoding=positional_encoding)
    given = sorted(name for name, cfg in mmdet_style.items()
                   if cfg is not None)
    if transformer is not None:
        if given:
            raise ValueError(
                f'{detector}: give model.transformer (the plugin\'s '
                'layout) or model.encoder, model.decoder and '
                'model.positional_encoding (mmdet\'s layout), not both; got '
                f'transformer and {given}. A config inheriting from the '
                'plugin\'s configs sets its transformer with '
                'model.transformer.encoder and so on.')
        return transformer
    missing = sorted(set(mmdet_style) - set(given))
    if missing:
        raise ValueError(
            f'{detector} needs model.transformer, or model.encoder, '
            'model.decoder and model.positional_encoding as in mmdet\'s '
            f'configs; model.{", model.".join(missing)} missing.')
    return dict(type=transformer_type, **mmdet_style)


def check_training_classes(detector, args) -> None:
    """Forward pre-hook: stop a training run whose data set has another
    number of classes than the detector, at its first step.

    The plugin's configs check this with ``DatasetCheckHook`` before the
    run starts; a config inheriting mmdet's (its ``default_hooks`` lack the
    hook) would otherwise train a whole epoch and then crash in
    ``CocoMetric`` on the first prediction of a class the data set lacks.
    The classes are those of the training split, which MMEngine's
    ``RuntimeInfoHook`` (one of every runner's hooks) puts in the message
    hub while a training loop runs; outside one nothing is checked.

    Args:
        detector (nn.Module): The detector about to run a forward pass.
        args (tuple): The forward pass's positional arguments (unused).
    """
    if not detector.training:
        return
    from mmengine.logging import MessageHub
    message_hub = MessageHub.get_current_instance()
    runtime_info = message_hub.runtime_info
    if runtime_info.get('loop_stage') != 'train':
        return
    classes = (runtime_info.get('dataset_meta') or {}).get('classes')
    num_classes = getattr(detector.bbox_head, 'num_classes', None)
    if classes is None or num_classes is None:
        return
    from ...engine.dataset_check_hook import (DatasetModelMismatchError,
                                              check_classes)
    try:
        check_classes('train', 'the running training loop\'s', classes,
                      num_classes)
    except DatasetModelMismatchError:
        # The run ends here, before RuntimeInfoHook.after_train clears the
        # stage: later models of this process must not see it running.
        message_hub.pop_info('loop_stage')
        raise
