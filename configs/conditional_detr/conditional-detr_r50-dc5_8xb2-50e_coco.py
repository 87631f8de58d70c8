# Conditional DETR, DC5-R50: the last ResNet stage dilated instead of
# strided (the paper's DC5), so the encoder reads a stride-16 map of four
# times as many positions. Everything else is the R50 recipe.
_base_ = 'conditional-detr_r50_8xb2-50e_coco.py'

model = dict(backbone=dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2)))
