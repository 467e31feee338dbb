"""The job as one serialisable dataclass, and the ONE validation every entry point runs first.

``starfish run``, ``compare``, ``diagnose`` and the benchmark scripts all describe their job as a
``RunConfig`` and call ``validate`` before any model or image is loaded, so they refuse exactly
the same inputs with the same messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from starfish.distributed.context import is_writer
from starfish.experiments.defaults import RUN_BUDGET
from starfish.experiments.modality import modality_of_model
from starfish.errors import StarfishError
from starfish.heal import HealConfig
from starfish.common.outputs import check_output_dir
from starfish.pruning import PruneConfig

# Where a run writes, whether it may replace, how often it checkpoints and whether it continues a
# checkpoint: properties of one invocation, never of the job, so a saved config.json does not carry
# them (rerunning it must name a new --out, and must not silently resume or stop checkpointing).
INVOCATION_KEYS = ("out", "force", "checkpoint_every", "resume")
__all__ = ["INVOCATION_KEYS", "RUN_BUDGET", "RunConfig", "validate"]


@dataclass
class RunConfig:
    model: str = "cifar10-resnet20"
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    preprocess: dict | None = None  # overrides of the model's own preprocessing
    calib: str | None = None
    calib_size: float | None = None  # count, fraction in (0, 1), or None = the whole folder
    calib_max_gb: float = 4.0  # refuse a calibration set whose decoded size is larger than this
    eval: str | list[str] | None = None  # a folder/text, or (language models) several texts, each scored for perplexity
    eval_size: int | None = None  # None = the whole folder
    eval_tasks: list[str] | None = None  # causal LMs: zero-shot tasks scored through lm-evaluation-harness (starfish.zeroshot)
    eval_limit: int | None = None  # zero-shot: a seeded subset of this many items per task (None = all)
    tasks_data: str | None = None  # zero-shot task files (None: $STARFISH_TASKS_DATA, else ../shared/data/zeroshot)
    holdout: str | None = None  # unlabeled held-out folder/text (None: a draw from --calib outside the calibration draw)
    holdout_size: int | None = None  # held-out samples (None: 200 images, 16 text sequences)
    task: str = "auto"  # how models are scored (starfish.tasks); auto: perplexity for causal LMs, else classification
    dtype: str | None = None  # causal LMs: float32 | bfloat16 | float16 (None = float32)
    seq_len: int = 512  # causal LMs: tokens per calibration sequence
    calib_generate: int = 0  # causal LMs: sequences sampled from the dense model, added to the heal's calibration (starfish.data.generated_text)
    eval_seq_len: int | None = None  # causal LMs: tokens per evaluation window (None = the model's context, at most 2048)
    seed: int = 0
    masks: str | None = None  # start from saved masks instead of pruning
    prune: PruneConfig = field(default_factory=PruneConfig)
    repair: str = "auto"  # label-free repair after pruning: auto | none | bn | varmatch | bn+varmatch
    pipeline: str = "fixed"  # "auto": probe candidate pruners/allocations/repairs, finish the best (starfish.experiments.pipeline_choice)
    candidates: dict | None = None  # pipeline auto: {"pruner"|"allocation"|"repair": [names]} (None: what applies)
    probe_epochs: int = 3  # pipeline auto: epochs of each candidate's short heal
    probe_signal: str = "auto"  # pipeline auto: rank by held-out output "kl" or healing "objective" (auto: by network)
    repair_shrinkage: float = 0.0  # varmatch: > 0 keeps (nearly) collapsed channels from being blown up
    heal_from: str = "pruned"  # "pruned": start healing from the pruner's weights; "dense-masked": dense x mask
    # the heal settings: leave out, or name some in a dict ({"lr": 1e-3}), and the rest follow the model's
    # kind (``defaults.resolve_heal_settings``, as on the command line); a HealConfig is taken whole
    heal: HealConfig | Mapping | None = field(default=None, metadata={"section": HealConfig})  # a HealConfig once constructed
    out: str | None = None
    force: bool = False
    checkpoint_every: int | str = "auto"  # heal checkpoints beside --out: steps, "auto" (by time) or 0 (off)
    resume: bool = False  # continue the checkpoint an interrupted run left beside --out
    eval_batch_size: int = 256
    workers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.heal, HealConfig):
            from starfish.common.validation import config_types

            named = dict(self.heal or {})
            config_types(HealConfig, named, "heal.")  # a wrong type or unknown key names its key
            self.heal = HealConfig(**modality_of_model(self.model).heal_settings(named))
        if isinstance(self.eval, list) and len(self.eval) == 1:
            self.eval = self.eval[0]  # one source is saved as a plain path, as before several were allowed

    @property
    def eval_sources(self) -> list[str]:
        """Every --eval source, the first being the one the run's main scores come from."""
        if self.eval is None:
            return []
        return list(self.eval) if isinstance(self.eval, list) else [self.eval]

    def to_dict(self) -> dict:
        return asdict(self)

    def saved_dict(self) -> dict:
        """What config.json holds: the job, without the invocation's own settings (``INVOCATION_KEYS``)."""
        return {k: v for k, v in self.to_dict().items() if k not in INVOCATION_KEYS}

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        from starfish.common.validation import config_types

        config_types(cls, raw)  # wrong types, nulls and unknown keys name their key, no traceback
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise StarfishError(f"config has unknown keys {unknown}; known keys: {sorted(known)}.")
        raw = dict(raw)
        raw["prune"] = PruneConfig(**raw.get("prune", {}))
        return cls(**raw)

    def with_prune(self, **changes) -> "RunConfig":
        """A copy with some pruning settings replaced (a compare cell's sparsity and allocation)."""
        return replace(self, prune=replace(self.prune, **changes))


def validate(config: RunConfig, sparsities: list[float] | None = None, allocations: list[str] | None = None) -> None:
    """Everything that can be checked before any work starts.

    ``sparsities`` / ``allocations``: a grid (compare) checks the user's pruning settings at each of
    them, exactly as ``run`` checks its single one.
    """
    from starfish.pruning import list_allocations
    from starfish.pruning.pruners import get_pruner
    from starfish.repair import AUTO, list_repairs
    from starfish.tasks import TASKS

    for s in sparsities if sparsities is not None else [config.prune.sparsity]:
        for a in allocations if allocations is not None else [config.prune.allocation]:
            config.with_prune(sparsity=s, allocation=a).prune.validate()
            if a not in list_allocations():
                raise StarfishError(f"unknown allocation '{a}'; choose one of {', '.join(list_allocations())} (--allocation).")
    from starfish.heal.resume import check_resume
    from starfish.masks import Masks
    from starfish.common.validation import run_settings

    run_settings(config)
    from starfish.common.validation import pipeline_settings

    from starfish.pruning.pruners import list_pruners

    pipeline_settings(config, list_pruners(), list_allocations(), list_repairs())
    if config.masks:
        Masks.load(config.masks)  # a missing, corrupt or non-boolean masks file fails before any work
    pruner = get_pruner(config.prune.pruner)  # an unknown pruner is refused here, naming the choices
    config.heal.validate()
    if config.task != "auto":
        TASKS.get(config.task)
    if config.dtype not in (None, "float32", "bfloat16", "float16"):
        raise StarfishError(f"--dtype must be float32, bfloat16 or float16; got '{config.dtype}'.")
    for flag, value in (("--seq-len", config.seq_len), ("--eval-seq-len", config.eval_seq_len)):
        if value is not None and (not isinstance(value, int) or value < 2):
            raise StarfishError(f"{flag} must be a whole number of at least 2 tokens; got {value}.")
    check_language_scoring(config)
    if config.calib_max_gb <= 0:
        raise StarfishError(f"--calib-max-gb must be positive; got {config.calib_max_gb}.")
    from starfish.experiments.lm_checks import language_model_settings

    language_model_settings(config)
    if config.eval_batch_size < 1 or config.workers < 0:
        raise StarfishError(
            f"--eval-batch-size must be >= 1 and --workers >= 0; got {config.eval_batch_size} and {config.workers}."
        )
    if config.out is not None:  # under --distributed every rank checks; only rank 0 (the writer) takes the lock
        model_folder = config.model[len("hf:"):] if config.model.startswith("hf:") and Path(config.model[len("hf:"):]).exists() else None
        inputs = (config.weights, config.calib, *config.eval_sources, config.masks, config.holdout, model_folder, config.tasks_data)
        check_output_dir(config.out, config.force, inputs, claim=is_writer())
    check_resume(config)  # under the output lock: a checkpoint is resumed with the same settings or not at all
    if config.calib is None and config.heal.healer != "none":
        raise StarfishError("healing needs calibration images: pass --calib DIR (or --healer none).")
    if config.repair not in (AUTO, *list_repairs()):
        raise StarfishError(f"unknown repair '{config.repair}'; choose one of {AUTO}, {', '.join(list_repairs())}.")
    if config.calib is None and config.repair not in ("none", AUTO):
        raise StarfishError(f"repair '{config.repair}' needs calibration images: pass --calib DIR (or --repair none).")
    if config.holdout is not None and not Path(config.holdout).exists():
        raise StarfishError(f"held-out folder {config.holdout} does not exist; check --holdout (or drop it to draw from --calib).")
    if config.heal_from not in ("pruned", "dense-masked"):
        raise StarfishError(f"--heal-from must be 'pruned' or 'dense-masked'; got '{config.heal_from}'.")
    if config.calib_generate != int(config.calib_generate) or config.calib_generate < 0:
        raise StarfishError(f"--calib-generate counts sequences: pass a whole number >= 0 (got {config.calib_generate}).")
    if config.calib_generate and config.calib is None:
        raise StarfishError("--calib-generate adds sampled sequences to the calibration text: pass --calib TEXT too.")
    if config.calib_generate and not modality_of_model(config.model).language:
        raise StarfishError(f"--calib-generate applies to causal language models (hf:FOLDER); {config.model} is not one.")
    if config.calib is None and not config.masks and (pruner.needs_calibration or config.prune.allocation == "rr"):
        raise StarfishError(
            f"pruner '{config.prune.pruner}' / allocation '{config.prune.allocation}' needs calibration images: pass --calib DIR."
        )


def check_language_scoring(config: RunConfig) -> None:
    """Several --eval texts and --eval-tasks score causal LMs only; both are checked before any load."""

    sources = config.eval_sources
    if not all(isinstance(s, str) and s for s in sources):
        raise StarfishError(f"--eval must name folders or text files; got {config.eval!r}.")
    if len(set(sources)) != len(sources):
        raise StarfishError("--eval names the same source twice; name each text once.")
    if len(sources) < 2 and not config.eval_tasks and config.eval_limit is None:
        return
    if not modality_of_model(config.model).language:
        what = "--eval-tasks" if config.eval_tasks or config.eval_limit is not None else "more than one --eval"
        raise StarfishError(f"{what} applies to causal language models (hf:FOLDER); {config.model} is not one.")
    if len(sources) > 1:
        from starfish.data.text import text_files

        for source in sources:
            text_files(source)
    if config.eval_limit is not None and not config.eval_tasks:
        raise StarfishError("--eval-limit sets the items per zero-shot task: pass --eval-tasks too (or drop it).")
    if config.eval_tasks:
        from starfish.zeroshot import ZeroShot

        ZeroShot.check(config.eval_tasks, config.tasks_data, config.eval_limit, config.seed)
