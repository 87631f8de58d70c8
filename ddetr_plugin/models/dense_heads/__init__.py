"""Detection heads; importing registers them in the ``ddetr_plugin``
scope."""
from .deformable_detr_head import DeformableDETRHead
from .set_prediction_head import SetPredictionHead

__all__ = ['DeformableDETRHead', 'SetPredictionHead']
