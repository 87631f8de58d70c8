# Deformable DETR with ResNet-50 whose 3x3 convolutions in stages 2-4 (c3 to
# c5) are modulated deformable convolutions (DCNv2, mmcv's
# ModulatedDeformConv2dPack, which has a CPU kernel). Only the backbone's
# DCN keys change; the ImageNet weights and the neck are those of R50.
_base_ = 'deformable-detr_r50_16xb2-50e_coco.py'

model = dict(
    backbone=dict(
        dcn=dict(type='DCNv2', deform_groups=1, fallback_on_stride=False),
        stage_with_dcn=(False, True, True, True)))
