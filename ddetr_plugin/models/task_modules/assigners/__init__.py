"""Hungarian assigner and its match costs; importing registers them in the
``ddetr_plugin`` task-util registry."""
from .hungarian_assigner import MATCHED_PAIRS, HungarianAssigner
from .match_costs import BBoxL1Cost, FocalLossCost, IoUCost, MatchCost

__all__ = [
    'HungarianAssigner', 'MATCHED_PAIRS', 'MatchCost', 'FocalLossCost',
    'BBoxL1Cost', 'IoUCost'
]
