# Deformable DETR with ResNeXt-101 (64 groups of width 4): the backbone is
# replaced as a whole (_delete_=True drops the ResNet-50 keys); its stages
# 2-4 give the same channels as ResNet-50's, so the neck is unchanged.
_base_ = 'deformable-detr_r50_16xb2-50e_coco.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='ResNeXt',
        depth=101,
        groups=64,
        base_width=4,
        num_stages=4,
        out_indices=(1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        style='pytorch',
        init_cfg=dict(
            type='Pretrained', checkpoint='open-mmlab://resnext101_64x4d')),
    neck=dict(in_channels=[512, 1024, 2048]))
