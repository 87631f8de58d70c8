"""Training-time utilities of the detector (assignment of queries to ground
truth); importing registers them in the ``ddetr_plugin`` scope."""
from .assigners import (BBoxL1Cost, FocalLossCost, HungarianAssigner, IoUCost,
                        MatchCost)

__all__ = [
    'HungarianAssigner', 'MatchCost', 'FocalLossCost', 'BBoxL1Cost', 'IoUCost'
]
