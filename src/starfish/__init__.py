"""starfish: prune trained networks and heal them without labels.

    import starfish
    loaded = starfish.create_model("cifar10-resnet20", weights="resnet20_akamaster.th")
    sparse = copy.deepcopy(loaded.module)
    masks = starfish.prune(sparse, starfish.PruneConfig(sparsity=0.75))
    starfish.heal(loaded.module, sparse, masks, calibration_images, starfish.HealConfig())
"""

from starfish.version import __version__

from starfish.errors import StarfishError
from starfish.tasks.evaluate import Predictions, predict, summarize
from starfish.heal import HealConfig, HealResult, heal, list_healers
from starfish.hf_api import prune_and_heal
from starfish.masks import Masks
from starfish.models import LoadedModel, Preprocess, create_model, list_models, register_model
from starfish.experiments.run import RunConfig, run
from starfish.pruning import PruneConfig, list_allocations, list_pruners, prune
from starfish.repair import apply_repair, list_repairs
from starfish.nn.structure import find_blocks, prunable_targets

__all__ = [
    "HealConfig",
    "HealResult",
    "LoadedModel",
    "Masks",
    "Predictions",
    "Preprocess",
    "PruneConfig",
    "RunConfig",
    "StarfishError",
    "create_model",
    "find_blocks",
    "heal",
    "list_allocations",
    "list_healers",
    "list_models",
    "list_pruners",
    "list_repairs",
    "apply_repair",
    "predict",
    "prunable_targets",
    "prune_and_heal",
    "prune",
    "register_model",
    "run",
    "summarize",
]
