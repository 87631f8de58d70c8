"""Data sets of the plugin; imported by ``ddetr_plugin`` for registration."""
from .checked_coco import (AnnotationError, CheckedCocoDataset, ImageLoadError,
                           ImageSizeWarning, InvalidAnnotationWarning,
                           MissingAnnotationWarning)

__all__ = [
    'AnnotationError', 'CheckedCocoDataset', 'ImageLoadError',
    'ImageSizeWarning', 'InvalidAnnotationWarning', 'MissingAnnotationWarning'
]
