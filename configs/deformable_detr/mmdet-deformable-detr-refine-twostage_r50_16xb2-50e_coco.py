# MMDetection's own two-stage Deformable DETR config, run by the plugin's
# model: the two lines below are all a config inheriting from mmdet's needs.
# Everything else (ChannelMapper neck, data, schedule, runtime, default
# scope 'mmdet') stays mmdet's, and mmdet's checkpoints of this model load
# directly (renamed in memory).
_base_ = 'mmdet::deformable_detr/deformable-detr-refine-twostage_r50_16xb2-50e_coco.py'  # noqa: E501

custom_imports = dict(imports=['ddetr_plugin'], allow_failed_imports=False)
model = dict(_scope_='ddetr_plugin')
