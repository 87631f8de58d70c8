# Conditional DETR sized to train on two CPU cores in minutes, on the toy
# shapes data of tools/misc/make_toy_dataset.py:
#
#   python tools/misc/make_toy_dataset.py data/toy
#   python tools/train.py configs/toy/conditional-detr_toy.py
#
# It inherits the COCO DC5-R50 config and changes only sizes, data and
# schedule, as configs/toy/deformable-detr_toy.py does: a ResNet-18 of half
# width trained from scratch, 128 x 128 images (the dilated C5 gives an
# 8 x 8 map), 2 encoder and 3 decoder layers of 64 channels and 4 heads,
# no dropout, 50 queries. The detector, head, losses and matching are the
# same code and settings.
_base_ = '../conditional_detr/conditional-detr_r50-dc5_8xb2-50e_coco.py'

data_root = 'data/toy/'
image_size = 128
classes = ('red square', 'green circle', 'blue triangle', 'yellow diamond',
           'cyan cross', 'magenta hexagon', 'orange ring', 'white frame',
           'purple star', 'brown trapezoid')
embed_dims = 64
attention = dict(embed_dims=embed_dims, num_heads=4)
conditional_attention = dict(attention, attn_drop=0.0)
ffn = dict(
    embed_dims=embed_dims, feedforward_channels=4 * embed_dims, ffn_drop=0.0)

model = dict(
    num_queries=50,
    data_preprocessor=dict(mean=[127.5, 127.5, 127.5], std=[64.0, 64.0, 64.0]),
    backbone=dict(
        depth=18,
        base_channels=16,
        frozen_stages=-1,
        norm_cfg=dict(requires_grad=True),
        norm_eval=False,
        init_cfg=None),
    neck=dict(in_channels=[128], out_channels=embed_dims),
    transformer=dict(
        encoder=dict(
            num_layers=2,
            layer_cfg=dict(
                self_attn_cfg=dict(attention, dropout=0.0), ffn_cfg=ffn)),
        decoder=dict(
            num_layers=3,
            layer_cfg=dict(
                self_attn_cfg=conditional_attention,
                cross_attn_cfg=conditional_attention,
                ffn_cfg=ffn)),
        positional_encoding=dict(num_feats=embed_dims // 2)),
    bbox_head=dict(num_classes=len(classes), embed_dims=embed_dims))

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
    # Plain batches of 8: the toy images are all square.
    batch_sampler=None,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        filter_cfg=dict(_delete_=True, filter_empty_gt=False),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

# The backbone starts from random weights, so it learns at the full rate
# (the COCO configs slow down a pretrained one by lr_mult=0.1).
optim_wrapper = dict(
    optimizer=dict(lr=5e-4),
    clip_grad=dict(max_norm=1.0),
    paramwise_cfg=dict(custom_keys=dict(backbone=dict(lr_mult=1.0))))

max_epochs = 6
train_cfg = dict(max_epochs=max_epochs, val_interval=2)
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
    logger=dict(interval=20),
    checkpoint=dict(max_keep_ckpts=2),
    visualization=dict(score_thr=0.3))
log_processor = dict(window_size=20)
randomness = dict(seed=0)
