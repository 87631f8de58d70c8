"""Detection heads; importing registers them in the ``ddetr_plugin``
scope."""
from .conditional_detr_head import ConditionalDETRHead
from .deformable_detr_head import DeformableDETRHead
from .set_prediction_head import SetPredictionHead

__all__ = ['ConditionalDETRHead', 'DeformableDETRHead', 'SetPredictionHead']
