# Deformable DETR with ResNet-101: only the backbone's depth and its
# ImageNet weights change; ResNet-101's stages 2-4 give the same channels
# (512, 1024, 2048) as ResNet-50's, so the neck is unchanged.
_base_ = 'deformable-detr_r50_16xb2-50e_coco.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained',
                      checkpoint='torchvision://resnet101')))
