"""Necks; importing registers :class:`DeformableDetrNeck`."""
from .deformable_detr_neck import DeformableDetrNeck

__all__ = ['DeformableDetrNeck']
