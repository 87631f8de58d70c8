# Conditional DETR, DC5-R101: the dilated last stage of the DC5-R50 config
# on a ResNet-101 with its ImageNet weights (the paper's strongest
# single-scale setting). Everything else is the R50 recipe.
_base_ = 'conditional-detr_r50-dc5_8xb2-50e_coco.py'

model = dict(
    backbone=dict(
        depth=101,
        init_cfg=dict(type='Pretrained',
                      checkpoint='torchvision://resnet101')))
