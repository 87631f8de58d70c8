# Conditional DETR, DC5-R101: the R101 config with its last stage dilated
# instead of strided, as in the DC5-R50 config (the paper's strongest
# single-scale setting).
_base_ = 'conditional-detr_r101_8xb2-50e_coco.py'

model = dict(backbone=dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)))
