"""Models from spec strings, each paired with the preprocessing it was trained with."""

from starfish.models.registry import (
    LoadedModel,
    Preprocess,
    create_model,
    list_models,
    load_weights,
    register_model,
)
from starfish.models import cifar as _cifar  # noqa: F401  (registers the built-in networks)

__all__ = [
    "LoadedModel",
    "Preprocess",
    "create_model",
    "list_models",
    "load_weights",
    "register_model",
]
