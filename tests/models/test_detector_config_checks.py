"""Mistyped detector settings fail first, naming the key.

``--cfg-options model.num_queries=abc`` gives the detector a string; it
must say which key, what type it expected and what came, before building
anything. The detector also takes mmdet's layout of the transformer
(``encoder``, ``decoder``, ``positional_encoding``), but not both layouts
at once.
"""
import os.path as osp

import pytest
from mmengine.config import Config, DictAction

import ddetr_plugin  # noqa: F401
from ddetr_plugin.registry import MODELS
from testkit import REPO

TOY_CONFIG = osp.join(REPO, 'configs', 'toy', 'deformable-detr_toy.py')


def _model_cfg(*options):
    """The toy model config after ``--cfg-options`` as the tools parse
    them."""
    cfg = Config.fromfile(TOY_CONFIG)
    parsed = {}
    for option in options:
        key, value = option.split('=', 1)
        parsed[key] = DictAction._parse_iterable(value)
    cfg.merge_from_dict(parsed)
    return cfg.model


@pytest.mark.parametrize(('option', 'expected'), [
    ('model.num_queries=abc',
     "model.num_queries must be a positive int, got 'abc' (str)"),
    ('model.num_queries=2.5',
     'model.num_queries must be a positive int, got 2.5 (float)'),
    ('model.num_queries=0', 'model.num_queries must be a positive int'),
    ('model.num_feature_levels=four',
     "model.num_feature_levels must be a positive int, got 'four'"),
    ('model.as_two_stage=yes',
     "model.as_two_stage must be True or False, got 'yes' (str)"),
    ('model.with_box_refine=1',
     'model.with_box_refine must be True or False, got 1 (int)'),
])
def test_mistyped_cfg_options_name_the_key(option, expected):
    with pytest.raises((TypeError, ValueError)) as error:
        MODELS.build(_model_cfg(option))
    assert expected in str(error.value)


def test_valid_option_builds():
    model = MODELS.build(_model_cfg('model.num_queries=7'))
    assert model.num_queries == 7


def test_both_transformer_layouts_are_refused():
    model_cfg = _model_cfg()
    model_cfg.encoder = model_cfg.transformer.encoder
    with pytest.raises(
            ValueError, match=r"not both; got transformer and "
            r"\['encoder'\]"):
        MODELS.build(model_cfg)


def test_mmdet_layout_needs_all_three_parts():
    model_cfg = _model_cfg()
    transformer = model_cfg.pop('transformer')
    model_cfg.encoder = transformer.encoder
    model_cfg.decoder = transformer.decoder
    with pytest.raises(ValueError, match='model.positional_encoding missing'):
        MODELS.build(model_cfg)
    model_cfg.positional_encoding = transformer.positional_encoding
    model = MODELS.build(model_cfg)
    assert model.transformer.encoder.num_layers == 2
