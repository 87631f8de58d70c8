# MMDetection's own DETR (Carion et al., 2020) on the toy shapes data: the
# baseline of the convergence study (tools/misc/convergence_study.sh).
#
# It inherits the toy Deformable DETR config, so the data, augmentation,
# batch, optimizer, schedule and hooks are the same by construction; only
# the model is replaced, by mmdet's DETR (`_scope_='mmdet'`) at the toy
# size: the same ResNet-18 of half width from scratch, 64 channels, 4
# heads, 2 encoder and 3 decoder layers, no dropout, 50 queries. DETR reads
# the last backbone stage only; it is dilated (the papers' DC5: stride 16,
# 8 x 8 features of a 128 px image) as in the toy Conditional DETR, so that
# the two dense-attention models see the same features.
_base_ = './deformable-detr_toy.py'

embed_dims = 64
attention = dict(
    embed_dims=embed_dims, num_heads=4, dropout=0.0, batch_first=True)
ffn = dict(
    embed_dims=embed_dims,
    feedforward_channels=4 * embed_dims,
    num_fcs=2,
    ffn_drop=0.0,
    act_cfg=dict(type='ReLU', inplace=True))

model = dict(
    _delete_=True,
    _scope_='mmdet',
    type='DETR',
    num_queries=50,
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
        strides=(1, 2, 2, 1),
        dilations=(1, 1, 1, 2),
        out_indices=(3, ),
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        style='pytorch',
        init_cfg=None),
    neck=dict(
        type='ChannelMapper',
        in_channels=[128],
        kernel_size=1,
        out_channels=embed_dims,
        act_cfg=None,
        norm_cfg=None,
        num_outs=1),
    encoder=dict(
        num_layers=2, layer_cfg=dict(self_attn_cfg=attention, ffn_cfg=ffn)),
    decoder=dict(
        num_layers=3,
        layer_cfg=dict(
            self_attn_cfg=attention, cross_attn_cfg=attention, ffn_cfg=ffn),
        return_intermediate=True),
    positional_encoding=dict(num_feats=embed_dims // 2, normalize=True),
    bbox_head=dict(
        type='DETRHead',
        num_classes=10,
        embed_dims=embed_dims,
        loss_cls=dict(
            type='CrossEntropyLoss',
            bg_cls_weight=0.1,
            use_sigmoid=False,
            loss_weight=1.0,
            class_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=5.0),
        loss_iou=dict(type='GIoULoss', loss_weight=2.0)),
    train_cfg=dict(
        assigner=dict(
            type='HungarianAssigner',
            match_costs=[
                dict(type='ClassificationCost', weight=1.),
                dict(type='BBoxL1Cost', weight=5.0, box_format='xywh'),
                dict(type='IoUCost', iou_mode='giou', weight=2.0)
            ])),
    test_cfg=dict(max_per_img=50))
