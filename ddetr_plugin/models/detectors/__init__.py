"""Detectors; importing registers :class:`DeformableDETR`."""
from .deformable_detr import DeformableDETR

__all__ = ['DeformableDETR']
