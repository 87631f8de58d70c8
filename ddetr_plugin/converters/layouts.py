"""Recognising Deformable DETR weights saved by another implementation.

A user with weights from MMDetection's model zoo or from the official
repository who passes them straight to ``tools/test.py`` or as
``load_from`` would otherwise get a list of a few hundred mismatched keys
(test) or, worse, a model that silently keeps most of its random weights
(training: MMEngine loads non-strictly). Recognising the layout lets the
error say which converter to run, with the command.
"""
from typing import Iterable, Optional

# Module prefixes only each layout has at the top level of its state dict.
_OFFICIAL_PREFIXES = ('input_proj.', 'backbone.0.body.', 'class_embed.')
_MMDET_PREFIXES = ('encoder.layers.', 'decoder.layers.')

_CONVERTERS = {
    'mmdet': ('MMDetection 3.x', 'tools/model_converters/mmdet_to_plugin.py'),
    'official': ('the official Deformable-DETR or ConditionalDETR repository',
                 'tools/model_converters/official_to_plugin.py'),
}


def foreign_layout(keys: Iterable[str]) -> Optional[str]:
    """Which other implementation's layout a state dict's keys are in.

    Args:
        keys (Iterable[str]): The state dict's keys (a ``module.`` prefix
            of a wrapped model already removed).

    Returns:
        str, optional: ``'mmdet'`` for MMDetection 3.x's built-in Deformable
        DETR, ``'official'`` for the official repository, None otherwise
        (the plugin's own layout included: its transformer lives under
        ``transformer.``, MMDetection's at the top level).
    """
    keys = list(keys)
    if any(key.startswith(_OFFICIAL_PREFIXES) for key in keys):
        return 'official'
    if (any(key.startswith(_MMDET_PREFIXES) for key in keys)
            and not any(key.startswith('transformer.') for key in keys)):
        return 'mmdet'
    return None


# Module names only one of the two detectors has, in every layout (the
# plugin's, mmdet's, the official repositories').
_DETECTOR_MARKS = (
    ('ConditionalDETR', ('ref_point_head.', 'query_scale.')),
    ('DeformableDETR', ('sampling_offsets.', 'level_embed')),
)

# Where the plugin's configs of each detector live.
CONFIG_FOLDERS = dict(
    ConditionalDETR='conditional_detr', DeformableDETR='deformable_detr')


def detector_of(keys: Iterable[str]) -> Optional[str]:
    """Which detector a state dict's keys belong to, in any layout.

    Args:
        keys (Iterable[str]): State-dict keys.

    Returns:
        str, optional: ``'ConditionalDETR'``, ``'DeformableDETR'``, or None
        when neither is recognised.
    """
    keys = list(keys)
    for detector, marks in _DETECTOR_MARKS:
        if any(mark in key for key in keys for mark in marks):
            return detector
    return None


def conversion_hint(layout: str,
                    checkpoint: Optional[str],
                    config: Optional[str] = None) -> str:
    """One sentence naming the layout and the command that converts it.

    Args:
        layout (str): ``'mmdet'`` or ``'official'``.
        checkpoint (str, optional): The file to convert; None when only the
            weights are known (``IN.pth`` stands for the file then).
        config (str, optional): The plugin config to check the result
            against (``--config`` of the converters).
    """
    source, tool = _CONVERTERS[layout]
    name = checkpoint or 'IN.pth'
    output = name[:-4] if name.endswith('.pth') else name
    command = f'python {tool} {name} {output}_plugin.pth'
    if config is not None:
        command += f' --config {config}'
    holder = checkpoint if checkpoint else 'The weights being loaded'
    return (f'{holder} holds weights in the layout of '
            f'{source}; convert them for the plugin first: {command}')
