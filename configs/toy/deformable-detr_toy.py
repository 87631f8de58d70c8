# Deformable DETR (two-stage, box refinement) sized to train on two CPU
# cores in minutes, on the toy shapes data of tools/misc/make_toy_dataset.py:
#
#   python tools/misc/make_toy_dataset.py data/toy
#   python tools/train.py configs/toy/deformable-detr_toy.py
#
# Only the sizes differ from the COCO configs: a ResNet-18 of half width
# trained from scratch (nothing can be downloaded), 128 x 128 images, 2
# encoder and 3 decoder layers of 128 channels, and a schedule for a short
# run. The detector, head, losses and matching are the same code.
default_scope = 'ddetr_plugin'
custom_imports = dict(
    imports=['ddetr_plugin', 'ddetr_plugin.engine'],
    allow_failed_imports=False)

data_root = 'data/toy/'
image_size = 128
classes = ('red square', 'green circle', 'blue triangle', 'yellow diamond',
           'cyan cross', 'magenta hexagon', 'orange ring', 'white frame',
           'purple star', 'brown trapezoid')
embed_dims = 64
num_levels = 4

model = dict(
    type='DeformableDETR',
    num_queries=50,
    num_feature_levels=num_levels,
    with_box_refine=True,
    as_two_stage=True,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[127.5, 127.5, 127.5],
        std=[64.0, 64.0, 64.0],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    backbone=dict(
        type='ResNet',
        depth=18,
        base_channels=16,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),
    neck=dict(
        type='DeformableDetrNeck',
        in_channels=[32, 64, 128],
        out_channels=embed_dims,
        num_groups=16,
        bias=True),
    transformer=dict(
        type='DeformableDetrTransformer',
        encoder=dict(
            num_layers=2,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=embed_dims,
                    num_heads=4,
                    num_levels=num_levels,
                    num_points=4,
                    dropout=0.0),
                ffn_cfg=dict(
                    embed_dims=embed_dims,
                    feedforward_channels=4 * embed_dims,
                    ffn_drop=0.0))),
        decoder=dict(
            num_layers=3,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=embed_dims, num_heads=4, dropout=0.0),
                cross_attn_cfg=dict(
                    embed_dims=embed_dims,
                    num_heads=4,
                    num_levels=num_levels,
                    num_points=4,
                    dropout=0.0),
                ffn_cfg=dict(
                    embed_dims=embed_dims,
                    feedforward_channels=4 * embed_dims,
                    ffn_drop=0.0))),
        positional_encoding=dict(
            num_feats=embed_dims // 2, normalize=True, offset=-0.5)),
    bbox_head=dict(
        type='DeformableDETRHead',
        num_classes=len(classes),
        embed_dims=embed_dims,
        sync_cls_avg_factor=True,
        loss_cls=dict(
            type='FocalLoss',
            use_sigmoid=True,
            gamma=2.0,
            alpha=0.25,
            loss_weight=2.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='FocalLossCost', weight=2.0),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=100))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape',
                   'scale_factor'))
]
train_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type='CheckedCocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=False),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    persistent_workers=True,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type='CheckedCocoDataset',
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(
    type='CocoMetric',
    ann_file=data_root + 'annotations/instances_val.json',
    metric='bbox',
    format_only=False)
test_evaluator = val_evaluator

# The backbone starts from random weights, so it learns at the full rate
# (the COCO configs slow down a pretrained one by lr_mult=0.1).
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=5e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=1.0, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={
            'sampling_offsets': dict(lr_mult=0.1),
            'reference_points': dict(lr_mult=0.1)
        }))

max_epochs = 6
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=2)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=100),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[5],
        gamma=0.1)
]
auto_scale_lr = dict(base_batch_size=8)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='AtomicCheckpointHook', interval=1, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook', score_thr=0.3))
env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=True)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0)
