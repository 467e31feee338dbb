"""Healing hyperparameters; the defaults are the published STARFISH recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from starfish.errors import StarfishError
from starfish.heal.grad_checkpoint import GRAD_CHECKPOINT_MODES
from starfish.heal.precision import PRECISIONS

HEAL_SCOPES = ("joint", "blockwise")  # --heal-scope, and compare's HEALER@SCOPE


@dataclass
class HealConfig:
    healer: str = "starfish"
    epochs: int = 10  # the fixed budget (--budget fixed: the published recipe)
    budget: str = "fixed"  # "auto": stop on a held-out plateau (up to max_epochs); "fixed": train ``epochs``
    max_epochs: int = 60  # auto: the most epochs healing may take (the cosine schedule spans them)
    patience: int = 4  # auto: held-out evaluations without improvement before stopping
    eval_every: int = 2  # auto: epochs between held-out evaluations
    min_delta: float = 1e-3  # auto: a held-out value counts as better when below best x (1 - min_delta)
    batch_size: int = 32
    lr: float = 6e-4
    min_lr: float = 1e-6  # cosine decay per optimizer step, from lr down to this
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    max_steps: int | None = None  # cap on optimizer steps (None = epochs over the calibration set)
    cache_dtype: str = "auto"  # auto | float32 | float16 | bfloat16: storage of cached dense targets; auto picks
    # float16 when the dense model's measured activations fit it, else bfloat16 (heal.cache_dtype)
    cache_dtype_reason: str | None = None  # why that dtype (filled when auto is resolved)
    recompute_targets: bool = False  # True: run the dense model every step instead of caching
    cache_device: str | None = None  # None/"auto": pinned CPU memory when computing on an accelerator,
    # else the compute device; "cpu", a device name, or "disk" (memory-mapped files, removed afterwards)
    scope: str = "joint"  # "joint": one backward through the whole network (the published recipe);
    # "blockwise": each block trained alone against the dense block's output (memory of one block)
    blockwise_inputs: str = "sparse"  # blockwise: a block sees the healed network's stream or the dense one
    memory_limit_gb: float | None = None  # cap on the memory healing may plan to use (None = what is free)
    precision: str = "auto"  # autocast of the forward passes: fp32 | bf16 | fp16 | auto (bf16 on a bf16-capable
    # CUDA device, fp32 elsewhere) | native (auto, plus bf16 on a CPU with AMX/AVX512-BF16); weights, gradients, optimizer state and losses stay float32 (heal.precision)
    grad_checkpoint: str = "auto"  # joint scope: per-block gradient checkpointing on | off | auto (on only when
    # the memory plan says the run would not fit without it; heal.grad_checkpoint)
    divergence_factor: float = 1.5  # stop when the smoothed loss rises above this many times the first loss
    keep_best: bool = True  # on divergence, restore the weights seen at the best smoothed loss
    train_mode: bool = False  # True turns dropout on during healing (off by default)
    bn_mode: str = "train"  # "train": BatchNorm normalizes with batch statistics and re-estimates its
    # running statistics while healing (its affine parameters stay frozen); "frozen": eval-mode BN
    temperature: float = 1.0  # for logit distillation
    kd_weight: float | None = None  # starfish_kd: weight of the KL term; None = both terms equal on the first
    # batch before any update, then fixed (heal.objectives.balance_kd)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def validate(self) -> "HealConfig":
        from starfish.common.validation import heal_settings

        heal_settings(self)  # NaN/inf, negative decay or temperature, seeds, devices
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.min_lr < 0:
            raise StarfishError(
                "heal settings need epochs >= 0, batch size >= 1, lr > 0 and min lr >= 0; "
                f"got epochs={self.epochs}, batch={self.batch_size}, lr={self.lr}, min_lr={self.min_lr}."
            )
        if self.cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise StarfishError(f"cache dtype must be auto, float32, float16 or bfloat16; got {self.cache_dtype}.")
        if self.bn_mode not in ("train", "frozen"):
            raise StarfishError(f"bn mode must be 'train' or 'frozen'; got {self.bn_mode}.")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise StarfishError(f"optimizer must be adam, adamw or sgd; got {self.optimizer}.")
        if self.scope not in HEAL_SCOPES:
            raise StarfishError(f"--heal-scope must be 'joint' or 'blockwise'; got '{self.scope}'.")
        if self.blockwise_inputs not in ("sparse", "dense"):
            raise StarfishError(f"--blockwise-inputs must be 'sparse' or 'dense'; got '{self.blockwise_inputs}'.")
        if self.memory_limit_gb is not None and self.memory_limit_gb <= 0:
            raise StarfishError(f"--memory-limit-gb must be > 0; got {self.memory_limit_gb}.")
        if self.precision not in PRECISIONS:
            raise StarfishError(f"--precision must be one of {', '.join(PRECISIONS)}; got '{self.precision}'.")
        if self.grad_checkpoint not in GRAD_CHECKPOINT_MODES:
            raise StarfishError(f"--grad-checkpoint must be one of {', '.join(GRAD_CHECKPOINT_MODES)}; got '{self.grad_checkpoint}'.")
        if self.budget not in ("auto", "fixed"):
            raise StarfishError(f"--budget must be 'auto' or 'fixed'; got '{self.budget}'.")
        if self.max_epochs < 1 or self.patience < 1 or self.eval_every < 1 or not 0 <= self.min_delta < 1:
            raise StarfishError(
                "auto budget settings need --max-epochs, --patience and --eval-every >= 1 and 0 <= min delta < 1; "
                f"got {self.max_epochs}, {self.patience}, {self.eval_every}, {self.min_delta}."
            )
        if self.divergence_factor <= 1:
            raise StarfishError(f"divergence factor must be > 1; got {self.divergence_factor}.")
        return self

    def to_dict(self) -> dict:
        return asdict(self)
