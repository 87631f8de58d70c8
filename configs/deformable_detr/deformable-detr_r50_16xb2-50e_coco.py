# Deformable DETR, ResNet-50, COCO: the paper's recipe (50 epochs, lr step
# at 40, total batch 32 = 16 GPUs x 2 images).
_base_ = [
    '../_base_/datasets/coco_detection.py', '../_base_/default_runtime.py'
]

embed_dims = 256
num_levels = 4

model = dict(
    # The model and everything inside it (attention, assigner, match costs)
    # are built in the plugin's scope whatever the default scope of the
    # tool, e.g. mmdet's DetInferencer or tools of other packages.
    _scope_='ddetr_plugin',
    type='DeformableDETR',
    num_queries=300,
    num_feature_levels=num_levels,
    with_box_refine=False,
    as_two_stage=False,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    # num_outs comes from num_feature_levels.
    neck=dict(
        type='DeformableDetrNeck',
        in_channels=[512, 1024, 2048],
        out_channels=embed_dims,
        num_groups=32,
        bias=True),
    # num_feature_levels, num_queries and as_two_stage come from the
    # detector; num_levels of the attentions must equal num_feature_levels.
    transformer=dict(
        type='DeformableDetrTransformer',
        encoder=dict(
            num_layers=6,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=embed_dims,
                    num_heads=8,
                    num_levels=num_levels,
                    num_points=4,
                    dropout=0.1),
                ffn_cfg=dict(
                    embed_dims=embed_dims,
                    feedforward_channels=1024,
                    ffn_drop=0.1))),
        decoder=dict(
            num_layers=6,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=embed_dims, num_heads=8, dropout=0.1),
                cross_attn_cfg=dict(
                    embed_dims=embed_dims,
                    num_heads=8,
                    num_levels=num_levels,
                    num_points=4,
                    dropout=0.1),
                ffn_cfg=dict(
                    embed_dims=embed_dims,
                    feedforward_channels=1024,
                    ffn_drop=0.1))),
        positional_encoding=dict(
            num_feats=embed_dims // 2, normalize=True, offset=-0.5)),
    # share_pred_layer, num_pred_layer, as_two_stage, train_cfg and test_cfg
    # come from the detector.
    bbox_head=dict(
        type='DeformableDETRHead',
        num_classes=80,
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

# Multi-scale training: either resize the shorter side to 480-800, or
# resize to 400-600, crop 384-600, then resize to 480-800.
train_scales = [(480, 1333), (512, 1333), (544, 1333), (576, 1333),
                (608, 1333), (640, 1333), (672, 1333), (704, 1333),
                (736, 1333), (768, 1333), (800, 1333)]
train_pipeline = [
    dict(type='LoadImageFromFile', backend_args={{_base_.backend_args}}),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='RandomFlip', prob=0.5),
    dict(
        type='RandomChoice',
        transforms=[
            [
                dict(
                    type='RandomChoiceResize',
                    scales=train_scales,
                    keep_ratio=True)
            ],
            [
                dict(
                    type='RandomChoiceResize',
                    # 4200 leaves the long side free: COCO's aspect ratios
                    # stay below 7, as in the official implementation.
                    scales=[(400, 4200), (500, 4200), (600, 4200)],
                    keep_ratio=True),
                dict(
                    type='RandomCrop',
                    crop_type='absolute_range',
                    crop_size=(384, 600),
                    allow_negative_crop=True),
                dict(
                    type='RandomChoiceResize',
                    scales=train_scales,
                    keep_ratio=True)
            ]
        ]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(
    dataset=dict(
        filter_cfg=dict(filter_empty_gt=False), pipeline=train_pipeline))

# AdamW; the backbone, the sampling offsets and the reference points learn
# ten times slower, and gradients are clipped, as in the paper.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0002, weight_decay=0.0001),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1),
            'sampling_offsets': dict(lr_mult=0.1),
            'reference_points': dict(lr_mult=0.1)
        }))

max_epochs = 50
train_cfg = dict(
    type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[40],
        gamma=0.1)
]

# The learning rate above is for a total batch of 32 (16 GPUs x 2 images);
# --auto-scale-lr rescales it for other batch sizes.
auto_scale_lr = dict(base_batch_size=32)
