# Conditional DETR, ResNet-50, COCO: MMDetection 3.3.0's recipe for this
# file name (300 queries, AdamW 1e-4, backbone lr x0.1, gradient clip 0.1,
# 50 epochs with the lr step at 40, total batch 16 = 8 GPUs x 2 images).
#
# Dropout follows mmdet's config: 0.1 on the decoder's attention weights
# (attn_drop) and none after its attentions; the official repository also
# drops 0.1 of each decoder attention's output (proj_drop=0.1 here).
_base_ = [
    '../_base_/datasets/coco_detection.py', '../_base_/default_runtime.py'
]

embed_dims = 256
# The decoder's attentions: content and position projected apart.
conditional_attention = dict(
    embed_dims=embed_dims, num_heads=8, attn_drop=0.1, proj_drop=0.0)
ffn = dict(embed_dims=embed_dims, feedforward_channels=2048, ffn_drop=0.1)

model = dict(
    # Built in the plugin's scope whatever the tool's default scope.
    _scope_='ddetr_plugin',
    type='ConditionalDETR',
    num_queries=300,
    data_preprocessor=dict(
        type='DetDataPreprocessor',
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_size_divisor=1),
    # C5 only (stride 32).
    backbone=dict(
        type='ResNet',
        depth=50,
        num_stages=4,
        out_indices=(3, ),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')),
    # A 1x1 projection with bias, no norm; num_outs=1 comes from the
    # detector.
    neck=dict(
        type='ChannelMapper',
        in_channels=[2048],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=None),
    # num_queries comes from the detector.
    transformer=dict(
        type='ConditionalDetrTransformer',
        encoder=dict(
            num_layers=6,
            layer_cfg=dict(
                self_attn_cfg=dict(
                    embed_dims=embed_dims, num_heads=8, dropout=0.1),
                ffn_cfg=ffn)),
        decoder=dict(
            num_layers=6,
            layer_cfg=dict(
                self_attn_cfg=conditional_attention,
                cross_attn_cfg=conditional_attention,
                ffn_cfg=ffn)),
        # Offset 0, unlike Deformable DETR's -0.5.
        positional_encoding=dict(
            num_feats=embed_dims // 2, normalize=True, offset=0.0)),
    # train_cfg and test_cfg come from the detector.
    bbox_head=dict(
        type='ConditionalDETRHead',
        num_classes=80,
        embed_dims=embed_dims,
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

# DETR's augmentation: either resize the shorter side to 480-800, or
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
        transforms=[[
            dict(
                type='RandomChoiceResize',
                scales=train_scales,
                keep_ratio=True)
        ],
                    [
                        dict(
                            type='RandomChoiceResize',
                            scales=[(400, 1333), (500, 1333), (600, 1333)],
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
                    ]]),
    dict(type='PackDetInputs')
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))

# AdamW; the pretrained backbone learns ten times slower; gradients are
# clipped at norm 0.1.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=0.0001, weight_decay=0.0001),
    clip_grad=dict(max_norm=0.1, norm_type=2),
    paramwise_cfg=dict(
        custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=1.0)}))

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

# The learning rate above is for a total batch of 16 (8 GPUs x 2 images);
# --auto-scale-lr rescales it for other batch sizes.
auto_scale_lr = dict(base_batch_size=16)
