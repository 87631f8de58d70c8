"""Hungarian assigner and its match costs; importing registers them in the
``ddetr_plugin`` task-util registry."""
from .hungarian_assigner import HungarianAssigner
from .match_costs import BBoxL1Cost, FocalLossCost, IoUCost, MatchCost

__all__ = [
    'HungarianAssigner', 'MatchCost', 'FocalLossCost', 'BBoxL1Cost', 'IoUCost'
]
