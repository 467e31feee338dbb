"""Pruners, one file each, registered by name in ``PRUNERS`` (see ``base`` for the protocol)."""

from starfish.pruning.pruners.base import PRUNERS, Pruner, Scorer, get_pruner, list_pruners, register_pruner
from starfish.pruning.pruners import magnitude, random, sparsegpt, wanda  # noqa: F401 (registers them)
from starfish.pruning.pruners.magnitude import magnitude_scores
from starfish.pruning.pruners.random import random_scores
from starfish.pruning.pruners.wanda import wanda_scores

__all__ = ["PRUNERS", "Pruner", "Scorer", "get_pruner", "list_pruners", "magnitude_scores", "random_scores", "register_pruner", "wanda_scores"]
