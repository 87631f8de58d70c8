"""Registries of the ``ddetr_plugin`` scope.

Every registry here is a child of the MMDetection registry of the same kind,
so a config whose ``default_scope`` is ``'ddetr_plugin'`` finds the plugin's
classes first and falls back to MMDetection's (ResNet, Swin, CocoDataset,
CocoMetric, hooks...) and then MMEngine's. Names registered here never
replace MMDetection's: ``mmdet.DeformableDETR`` stays mmdet's own model.

Each child lists MMDetection's module next to the plugin's as a lazy import
location, because a child registry looks into its parents' tables without
importing the parents' modules.
"""
from mmdet import registry as mmdet_registry
from mmengine.registry import Registry

SCOPE = 'ddetr_plugin'


def _child(name: str, parent: Registry, plugin_locations=()) -> Registry:
    """Make the plugin's child of an MMDetection registry."""
    return Registry(
        name,
        parent=parent,
        scope=SCOPE,
        locations=list(plugin_locations) + list(parent._locations))


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
