# Conditional DETR with ResNet-101: only the backbone's depth and its
# ImageNet weights change; C5 has the same 2048 channels.
_base_ = 'conditional-detr_r50_8xb2-50e_coco.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained',
                      checkpoint='torchvision://resnet101')))
