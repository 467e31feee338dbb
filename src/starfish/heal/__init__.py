"""Healing: train the surviving weights of a pruned model so it behaves like the dense one again."""

from starfish.heal.config import HealConfig
from starfish.heal.healing import HealResult, heal
from starfish.heal.objectives import OBJECTIVES, Objective, list_healers, register_objective

__all__ = ["HealConfig", "HealResult", "OBJECTIVES", "Objective", "heal", "list_healers", "register_objective"]
