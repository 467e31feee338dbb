"""Pruning: which weights go (a pruner's scores) and how many per layer (an allocation)."""

from starfish.pruning.allocation import ALLOCATIONS, allocate, list_allocations
from starfish.pruning.config import PruneConfig
from starfish.pruning.prune import prune, prune_with_notes
from starfish.pruning.pruners import PRUNERS, list_pruners

__all__ = ["ALLOCATIONS", "PRUNERS", "PruneConfig", "allocate", "list_allocations", "list_pruners", "prune", "prune_with_notes"]
