# Runtime shared by the plugin's configs: the plugin's registry scope (which
# falls back to MMDetection's and MMEngine's), hooks, logging, environment.
default_scope = 'ddetr_plugin'
custom_imports = dict(imports=['ddetr_plugin'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='AtomicCheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    # DetVisualizationHook that scales small images up before drawing and
    # writes the predictions of each image to a file of their own.
    visualization=dict(type='ddetr_plugin.ScaledDetVisualizationHook'),
    # Every split's classes against model.bbox_head.num_classes, before the
    # first step of training, validation or test. The scope prefix finds
    # the plugin's hooks whatever a tool sets as its default scope.
    dataset_check=dict(type='ddetr_plugin.DatasetCheckHook'))

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False
