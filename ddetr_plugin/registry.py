"""Registries of the ``ddetr_plugin`` scope.

Every registry here is a child of the MMDetection registry of the same kind,
so a config whose ``default_scope`` is ``'ddetr_plugin'`` finds the plugin's
classes first and falls back to MMDetection's (ResNet, Swin, CocoDataset,
CocoMetric, hooks...) and then MMEngine's. Names registered here never
replace MMDetection's: ``mmdet.DeformableDETR`` stays mmdet's own model.

Each child lists MMDetection's module next to the plugin's as a lazy import
location, because a child registry looks into its parents' tables without
importing the parents' modules.

Programs that build in the ``mmdet`` scope whatever the config says
(``DetInferencer`` builds the test data set for its palette) would not find
the plugin's own names there; :func:`expose_new_names` adds the names that
MMDetection and MMEngine lack (``CheckedCocoDataset``,
``AtomicCheckpointHook``...) to MMDetection's registries too. Names they
have (``DeformableDETR``, ``HungarianAssigner``...) are left to them: a
plugin config reaches the plugin's through ``_scope_='ddetr_plugin'``.
"""
from mmdet import registry as mmdet_registry
from mmengine.registry import Registry

SCOPE = 'ddetr_plugin'

_CHILDREN = []


def _child(name: str, parent: Registry, plugin_locations=()) -> Registry:
    """Make the plugin's child of an MMDetection registry."""
    registry = Registry(
        name,
        parent=parent,
        scope=SCOPE,
        locations=list(plugin_locations) + list(parent._locations))
    _CHILDREN.append(registry)
    return registry


def expose_new_names() -> None:
    """Register the plugin's classes whose names MMDetection's registries
    (and MMEngine's above them) do not know in MMDetection's as well.

    Called once the plugin's modules are imported; safe to call again.
    """
    for registry in _CHILDREN:
        parent = registry.parent
        for name, cls in list(registry._module_dict.items()):
            if parent.get(name) is None:
                parent.register_module(name=name, module=cls)


RUNNERS = _child('runner', mmdet_registry.RUNNERS)
RUNNER_CONSTRUCTORS = _child('runner constructor',
                             mmdet_registry.RUNNER_CONSTRUCTORS)
LOOPS = _child('loop', mmdet_registry.LOOPS)
HOOKS = _child('hook', mmdet_registry.HOOKS)
DATASETS = _child('dataset', mmdet_registry.DATASETS,
                  ['ddetr_plugin.datasets'])
DATA_SAMPLERS = _child('data sampler', mmdet_registry.DATA_SAMPLERS)
TRANSFORMS = _child('transform', mmdet_registry.TRANSFORMS,
                    ['ddetr_plugin.datasets'])
MODELS = _child('model', mmdet_registry.MODELS, ['ddetr_plugin.models'])
MODEL_WRAPPERS = _child('model_wrapper', mmdet_registry.MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child('weight initializer',
                             mmdet_registry.WEIGHT_INITIALIZERS)
OPTIMIZERS = _child('optimizer', mmdet_registry.OPTIMIZERS)
OPTIM_WRAPPERS = _child('optim_wrapper', mmdet_registry.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child('optimizer constructor',
                                    mmdet_registry.OPTIM_WRAPPER_CONSTRUCTORS)
PARAM_SCHEDULERS = _child('parameter scheduler',
                          mmdet_registry.PARAM_SCHEDULERS)
METRICS = _child('metric', mmdet_registry.METRICS)
EVALUATOR = _child('evaluator', mmdet_registry.EVALUATOR)
TASK_UTILS = _child('task util', mmdet_registry.TASK_UTILS,
                    ['ddetr_plugin.models'])
VISUALIZERS = _child('visualizer', mmdet_registry.VISUALIZERS)
VISBACKENDS = _child('vis_backend', mmdet_registry.VISBACKENDS)
LOG_PROCESSORS = _child('log_processor', mmdet_registry.LOG_PROCESSORS)
