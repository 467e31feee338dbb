"""The ``starfish`` command: run, compare, diagnose, demo, models.

Every flag maps onto a field of ``RunConfig`` through one flag table shared by run, compare and
diagnose; ``--config FILE`` loads a saved config (for example an earlier run's ``config.json``)
and any flag given on the command line overrides it. Where to write (``--out``) and whether to
replace (``--force``) always come from the command line, never from a config file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from starfish.errors import StarfishError
from starfish.common.signals import sigterm_handled_by
from starfish.common.validation import PROBE_SIGNALS


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line naming the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _checked(check: Callable[[object], object], text: object, parse: Callable = float):
    """Parse ``text`` and run a ``starfish.common.validation`` check on it; its one-line message becomes argparse's."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if parse is int else 'a number'}, got '{text}'") from None
    try:
        return check(value)
    except StarfishError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_arg(text: str) -> float:
    """A count (200) or a fraction of the folder (0.004); NaN, inf, 0 and 1.5 are refused."""
    from starfish.common.validation import size

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 200 or a fraction like 0.004, got '{text}'") from None
    return _checked(lambda v: size("value", v), value, parse=lambda v: v)


def floats_arg(text: str) -> list[float]:
    import math

    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got '{text}'")
    return values


def std_arg(text: str) -> list[float]:
    """Normalization std: finite, non-zero (inputs are divided by it), one or three values."""
    from starfish.common.validation import floats

    return _checked(lambda v: floats("value", v, nonzero=True), floats_arg(text), parse=lambda v: v)


def positive_float(text: str) -> float:
    from starfish.common.validation import positive

    return _checked(lambda v: positive("value", v), text)


def non_negative_float(text: str) -> float:
    from starfish.common.validation import non_negative

    return _checked(lambda v: non_negative("value", v), text)


def positive_int(text: str) -> int:
    from starfish.common.validation import integer

    return _checked(lambda v: integer("value", v, 1), text, parse=int)


def non_negative_int(text: str) -> int:
    from starfish.common.validation import integer

    return _checked(lambda v: integer("value", v, 0), text, parse=int)


def seed_arg(text: str) -> int:
    from starfish.common.validation import seed

    return _checked(lambda v: seed("value", v), text, parse=int)


def regex_arg(text: str) -> str:
    from starfish.common.validation import regex

    return _checked(lambda v: regex("value", v), text, parse=str)


def device_arg(text: str) -> str:
    from starfish.common.validation import device

    return _checked(lambda v: device("value", v), text, parse=str)


def checkpoint_every_arg(text: str) -> int | str:
    """'auto' or a whole number of optimizer steps (0 = off)."""
    from starfish.heal.resume import AUTO, check_every

    if text == AUTO:
        return AUTO
    try:
        return check_every(int(text))
    except (ValueError, StarfishError):
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 (off) or a number of optimizer steps, got '{text}'") from None


def cache_device_arg(text: str) -> str:
    """Where cached dense targets live: a device, or 'disk' (memory-mapped files)."""
    return text if text == "disk" else device_arg(text)


# Value checks per flag, applied by add_run_flags (config files get the same checks in validate()).
FLAG_TYPES: dict[str, Callable[[str], object]] = {
    "--num-classes": positive_int,
    "--input-size": positive_int,
    "--resize": positive_int,
    "--std": std_arg,
    "--eval-size": positive_int,
    "--eval-limit": positive_int,
    "--seed": seed_arg,
    "--include": regex_arg,
    "--exclude": regex_arg,
    "--blocks": regex_arg,
    "--sparsegpt-damp": positive_float,
    "--sparsegpt-blocksize": positive_int,
    "--repair-shrinkage": non_negative_float,
    "--epochs": non_negative_int,
    "--max-epochs": positive_int,
    "--patience": positive_int,
    "--eval-every": positive_int,
    "--holdout-size": positive_int,
    "--batch-size": positive_int,
    "--lr": positive_float,
    "--min-lr": non_negative_float,
    "--weight-decay": non_negative_float,
    "--max-steps": positive_int,
    "--temperature": positive_float,
    "--kd-weight": non_negative_float,
    "--device": device_arg,
    "--cache-device": cache_device_arg,
    "--eval-batch-size": positive_int,
    "--workers": non_negative_int,
    "--seq-len": positive_int,
    "--calib-generate": non_negative_int,
    "--checkpoint-every": checkpoint_every_arg,
    "--eval-seq-len": positive_int,
}


S = argparse.SUPPRESS


class _EvalSources(argparse.Action):
    """``--eval`` once keeps a plain path; given again, the sources become a list (language models)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        earlier = getattr(namespace, self.dest, None)
        if isinstance(earlier, str):
            setattr(namespace, self.dest, [earlier, values])
        elif isinstance(earlier, list):
            setattr(namespace, self.dest, [*earlier, values])
        else:
            setattr(namespace, self.dest, values)


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# (flag, dest in RunConfig as dotted path, argparse kwargs)
RUN_FLAGS: list[tuple[str, str, dict]] = [
    ("--config", "_config", dict(help="load a saved run config (JSON); flags given here override it")),
    ("--model", "model", dict(help="built-in name, timm:<name>, torchvision:<name> or package.module:factory")),
    ("--weights", "weights", dict(help="state dict (.pth/.pt/.th) or .safetensors, loaded strictly")),
    ("--pretrained", "pretrained", dict(action="store_true", help="download pretrained weights through timm/torchvision")),
    ("--num-classes", "num_classes", dict(type=int, help="classifier size for timm/torchvision/user models")),
    ("--input-size", "preprocess.input_size", dict(type=int, help="override the model's input size")),
    ("--resize", "preprocess.resize", dict(type=int, help="resize the shorter side to this before a center crop")),
    ("--mean", "preprocess.mean", dict(type=floats_arg, help="override normalization mean, e.g. 0.5,0.5,0.5")),
    ("--std", "preprocess.std", dict(type=floats_arg, help="override normalization std")),
    ("--channels", "preprocess.channels", dict(type=int, choices=[1, 3], help="image channels the model takes: 3 (RGB) or 1 (grayscale); default from the model")),
    ("--calib", "calib", dict(help="folder of unlabeled calibration images (class sub-folders allowed, labels unused)")),
    ("--calib-size", "calib_size", dict(type=size_arg, help="number of calibration images, or a fraction of the folder (default all)")),
    ("--calib-max-gb", "calib_max_gb", dict(type=float, help="refuse a calibration set larger than this once decoded (default 4)")),
    ("--eval", "eval", dict(action=_EvalSources, help="evaluation folder with one sub-folder per class (streamed, never held in memory); language models: a text, repeatable (each scored for perplexity)")),
    ("--eval-size", "eval_size", dict(type=int, help="fixed, seeded, class-balanced evaluation subset (default all)")),
    ("--eval-tasks", "eval_tasks", dict(type=_names, help="causal LMs: zero-shot tasks scored through lm-evaluation-harness for dense, pruned and healed (e.g. lambada,piqa,arc_easy, or standard)")),
    ("--eval-limit", "eval_limit", dict(type=int, help="zero-shot: a seeded subset of this many items per task (default all)")),
    ("--tasks-data", "tasks_data", dict(help="zero-shot task files (default $STARFISH_TASKS_DATA, else ../shared/data/zeroshot)")),
    ("--task", "task", dict(help="how models are scored on --eval: auto (default: perplexity for causal LMs, classification otherwise), classification, perplexity")),
    ("--dtype", "dtype", dict(choices=["float32", "bfloat16", "float16"], help="causal LMs: precision the model is loaded in (default float32)")),
    ("--seq-len", "seq_len", dict(type=int, help="causal LMs: tokens per calibration sequence (default 512)")),
    ("--calib-generate", "calib_generate", dict(type=int, help="causal LMs: add N sequences sampled from the dense model (seeded) to the heal's calibration; saved as calibration_generated.jsonl (default 0)")),
    ("--eval-seq-len", "eval_seq_len", dict(type=int, help="causal LMs: tokens per evaluation window (default the model's context, at most 2048)")),
    ("--seed", "seed", dict(type=int, help="seed for sampling, pruning and healing (default 0)")),
    ("--masks", "masks", dict(help="apply saved masks.safetensors instead of pruning")),
    ("--sparsity", "prune.sparsity", dict(type=float, help="fraction of prunable weights removed, in [0, 1)")),
    ("--pruner", "prune.pruner", dict(help="which weights go: magnitude (default) | wanda | sparsegpt | random")),
    ("--allocation", "prune.allocation", dict(help="how many weights each layer loses: uniform (default) | global | erk | lamp | rr")),
    ("--include", "prune.include", dict(help="regex over parameter names: prune these weights instead of the block defaults")),
    ("--exclude", "prune.exclude", dict(help="regex over parameter names: never prune these")),
    ("--blocks", "prune.blocks", dict(help="regex over module names that marks the blocks (default: discovered)")),
    ("--pattern", "prune.pattern", dict(help="N:M semi-structured sparsity, e.g. 2:4 (needs --sparsity 1-N/M)")),
    ("--sparsegpt-damp", "prune.damp", dict(type=float, help="sparsegpt Hessian damping, fraction of its mean diagonal (default 0.01)")),
    ("--sparsegpt-blocksize", "prune.blocksize", dict(type=int, help="sparsegpt columns per block (default 128)")),
    ("--repair", "repair", dict(help="label-free repair after pruning: auto (default: varmatch unless BatchNorm heals in train mode) | none | bn | varmatch | bn+varmatch")),
    ("--pipeline", "pipeline", dict(choices=["fixed", "auto"], help="fixed (default): prune with --pruner/--allocation/--repair; auto: give each candidate a short heal, rank them on held-out unlabeled data, finish the best (flags you name stay fixed)")),
    ("--probe-epochs", "probe_epochs", dict(type=int, help="--pipeline auto: epochs of each candidate's short heal (default 3)")),
    ("--probe-signal", "probe_signal", dict(choices=list(PROBE_SIGNALS), help="--pipeline auto: rank candidates by the held-out output KL or the held-out healing objective (default auto: objective for networks with BatchNorm, else KL)")),
    ("--try-pruners", "candidates.pruner", dict(type=_names, metavar="P1,P2,...", help="--pipeline auto: pruners to try (default magnitude,wanda,sparsegpt)")),
    ("--try-allocations", "candidates.allocation", dict(type=_names, metavar="A1,A2,...", help="--pipeline auto: allocations to try (default uniform,erk,lamp; language models and N:M uniform)")),
    ("--try-repairs", "candidates.repair", dict(type=_names, metavar="R1,R2,...", help="--pipeline auto: repairs to try (default none,varmatch; language models none)")),
    ("--repair-shrinkage", "repair_shrinkage", dict(type=float, help="varmatch shrinkage > 0 keeps collapsed channels from being blown up")),
    ("--heal-from", "heal_from", dict(choices=["pruned", "dense-masked"], help="start healing from the pruner's weights (default) or dense x mask")),
    ("--healer", "heal.healer", dict(help="starfish (default; language models: kd), kd, starfish_kd, starfish_norm, nmse, finetune (uses labels) or none")),
    ("--budget", "heal.budget", dict(choices=["auto", "fixed"], help="auto (default): stop when the healing objective on held-out unlabeled images stops improving, keep the best weights; fixed: train --epochs (the published recipe: --budget fixed)")),
    ("--epochs", "heal.epochs", dict(type=int, help="epochs of the fixed budget (default 10); without --budget it implies --budget fixed")),
    ("--max-epochs", "heal.max_epochs", dict(type=int, help="budget auto: the most epochs (the cosine schedule spans them; default 60, language models 5)")),
    ("--patience", "heal.patience", dict(type=int, help="budget auto: held-out evaluations without improvement before stopping (default 4, language models 2)")),
    ("--eval-every", "heal.eval_every", dict(type=int, help="budget auto: epochs between held-out evaluations (default 2, language models 1)")),
    ("--holdout", "holdout", dict(help="unlabeled held-out images (or text) for --budget auto and the alignment probe (default: a draw from --calib apart from the calibration images)")),
    ("--holdout-size", "holdout_size", dict(type=int, help="held-out samples (default 200 images, 16 text sequences)")),
    ("--batch-size", "heal.batch_size", dict(type=int, help="healing batch (default 32, language models 8)")),
    ("--lr", "heal.lr", dict(type=float, help="initial learning rate, cosine-decayed to --min-lr (default 6e-4, language models 3e-4)")),
    ("--min-lr", "heal.min_lr", dict(type=float)),
    ("--optimizer", "heal.optimizer", dict(choices=["adam", "adamw", "sgd"])),
    ("--weight-decay", "heal.weight_decay", dict(type=float)),
    ("--max-steps", "heal.max_steps", dict(type=int, help="cap on optimizer steps; without --budget it implies --budget fixed")),
    ("--cache-dtype", "heal.cache_dtype", dict(choices=["auto", "float32", "float16", "bfloat16"], help="storage of cached dense targets (default auto: float16 when the dense activations measured on the calibration set fit it, else bfloat16)")),
    ("--recompute-targets", "heal.recompute_targets", dict(action="store_true", help="run the dense model every step instead of caching its outputs")),
    ("--cache-device", "heal.cache_device", dict(help="where cached dense outputs live: auto (pinned CPU beside a GPU, default), cpu, cuda, or disk (memory-mapped temp files)")),
    ("--heal-scope", "heal.scope", dict(choices=["joint", "blockwise"], help="joint (default, the published recipe) or blockwise (one block at a time: memory of one block)")),
    ("--blockwise-inputs", "heal.blockwise_inputs", dict(choices=["sparse", "dense"], help="blockwise: a block sees the healed network's stream (sparse, default) or the dense one")),
    ("--precision", "heal.precision", dict(choices=["auto", "native", "fp32", "bf16", "fp16"], help="autocast of the healing forward passes; weights, optimizer and loss stay float32 (default auto: bf16 on a CUDA GPU that supports it, else fp32; language models: native, i.e. also bf16 on a CPU with AMX/AVX512-BF16)")),
    ("--grad-checkpoint", "heal.grad_checkpoint", dict(choices=["auto", "on", "off"], help="joint healing: recompute each block in the backward pass instead of keeping its activations (default auto: on only when the memory plan needs it)")),
    ("--memory-limit-gb", "heal.memory_limit_gb", dict(type=float, help="refuse to heal when the memory estimate exceeds this (default: what is free)")),
    ("--train-mode", "heal.train_mode", dict(action="store_true", help="heal with dropout on")),
    ("--bn-mode", "heal.bn_mode", dict(choices=["train", "frozen"], help="BatchNorm while healing: batch statistics + re-estimated running stats (train, default) or eval-mode (frozen)")),
    ("--temperature", "heal.temperature", dict(type=float, help="softmax temperature of the kd healer (default 1)")),
    ("--kd-weight", "heal.kd_weight", dict(type=float, help="starfish_kd: weight of the KL term (default: both terms equal on the first batch, then fixed)")),
    ("--device", "heal.device", dict(help="auto (default), cpu, cuda, cuda:1, ...")),
    ("--no-progress", "heal.progress", dict(action="store_false", help="hide progress bars")),
    ("--eval-batch-size", "eval_batch_size", dict(type=int)),
    ("--workers", "workers", dict(type=int, help="data-loader worker processes (default 0)")),
    ("--out", "out", dict(help="output directory (refused if it exists unless --force)")),
    ("--force", "force", dict(action="store_true", help="replace an existing output directory")),
    ("--checkpoint-every", "checkpoint_every", dict(help="save the healing state beside --out every N optimizer steps, auto (default: every few minutes) or 0 (off)")),
    ("--resume", "resume", dict(action="store_true", help="continue the heal an interrupted run on the same --out left checkpointed (same settings)")),
]


# The model, preprocessing and data flags: every subcommand that loads a model and images takes them.
MODEL_FLAGS = ("--config", "--model", "--weights", "--pretrained", "--num-classes", "--dtype")
PREPROCESS_FLAGS = ("--input-size", "--resize", "--mean", "--std")
DATA_FLAGS = ("--calib", "--calib-size", "--calib-max-gb", "--holdout", "--holdout-size", "--eval", "--eval-size", "--task", "--seq-len", "--eval-seq-len", "--seed", "--eval-batch-size", "--workers")
# What ``diagnose`` takes besides those: which weights, its per-layer sparsity, where to run and write.
DIAGNOSE_FLAGS = (*MODEL_FLAGS, *PREPROCESS_FLAGS, *DATA_FLAGS, "--sparsity", "--include", "--exclude", "--blocks",
                  "--device", "--no-progress", "--out", "--force")
COMPARE_SKIPS = (
    "--sparsity", "--healer", "--masks", "--repair", "--checkpoint-every", "--resume",
    "--pipeline", "--probe-epochs", "--probe-signal", "--try-pruners", "--try-allocations", "--try-repairs",
)  # the grid supplies these; no resume


def add_run_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    for flag, dest, kwargs in RUN_FLAGS:
        if flag not in skip and (only is None or flag in only):
            if flag in FLAG_TYPES:
                kwargs = {**kwargs, "type": FLAG_TYPES[flag]}
            if kwargs.get("action") is None and "choices" not in kwargs:
                kwargs = {"metavar": flag[2:].upper().replace("-", "_"), **kwargs}
            parser.add_argument(flag, dest=dest, default=S, **kwargs)


def config_from_args(args: argparse.Namespace):
    """Merge --config (if any) with the flags that were actually given."""
    from starfish.experiments.run_config import INVOCATION_KEYS, RunConfig

    given = vars(args)
    base: dict = {}
    if "_config" in given:
        path = Path(given["_config"])
        try:
            base = json.loads(path.read_text())
        except FileNotFoundError:
            raise StarfishError(f"config file {path} does not exist.") from None
        except json.JSONDecodeError as exc:
            raise StarfishError(f"config file {path} is not valid JSON ({exc}).") from None
        except (OSError, UnicodeDecodeError) as exc:  # a folder, no permission, binary contents
            raise StarfishError(f"cannot read config file {path} ({getattr(exc, 'strerror', None) or exc}); pass a JSON file.") from None
        if not isinstance(base, dict):
            raise StarfishError(f"config file {path} does not hold a JSON object.")
        from starfish.common.validation import config_types

        config_types(RunConfig, base)  # a wrong type is named even for keys a rerun then drops
        for key in INVOCATION_KEYS:  # older config.json files carried them; a rerun names its own
            base.pop(key, None)
    merged = dict(base)  # only what the file and the flags name: RunConfig resolves the rest (defaults.resolve_heal_settings)
    for dest, value in given.items():
        if dest.startswith("_") or dest in ("command", "handler"):
            continue
        head, _, tail = dest.partition(".")
        if tail:
            section = dict(merged.get(head) or {})
            section[tail] = value
            merged[head] = section
        else:
            merged[dest] = value
    fix_named_dimensions(merged, {k for k in given if not k.startswith("_")})
    return RunConfig.from_dict(merged)


def fix_named_dimensions(merged: dict, flags: set[str]) -> None:
    """``--pipeline auto`` searches only what the command line left open: ``--pruner wanda`` (or
    ``--allocation``, ``--repair`` other than auto) fixes that dimension to the named value."""
    if merged.get("pipeline") != "auto":
        return
    candidates = dict(merged.get("candidates") or {})
    prune = merged.get("prune") or {}
    for dim, dest, value in (
        ("pruner", "prune.pruner", prune.get("pruner")),
        ("allocation", "prune.allocation", prune.get("allocation")),
        ("repair", "repair", merged.get("repair")),
    ):
        if dest in flags and not candidates.get(dim) and value != "auto":
            candidates[dim] = [value]
    merged["candidates"] = candidates or None


def cmd_run(args: argparse.Namespace) -> int:
    from starfish.experiments.run import run
    from starfish.reporting.report import render_markdown

    from starfish.distributed import is_writer
    from starfish.experiments.launch import launched

    config = config_from_args(args)
    if config.out is None:
        raise StarfishError("pass --out DIR for the healed model, masks and reports.")
    with launched(args._distributed, config):
        report = run(config, command=_command_line())
        if not is_writer():
            return 0
    print(render_markdown(report).split("\n## Protocol")[0])
    files = "model/ (Hugging Face folder)" if report.get("task") == "perplexity" else "model.safetensors"
    print(f"wrote {config.out}/ ({files}, masks.safetensors, config.json, report.json, report.md)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from starfish.heal import list_healers
    from starfish.models.registry import describe_models
    from starfish.pruning import list_allocations, list_pruners

    for name, text in describe_models().items():
        print(f"{name:24s} {text}")
    print("timm:<name>              any timm model (timm.list_models())")
    print("torchvision:<name>       any torchvision classification model")
    print("package.module:factory   any callable returning an nn.Module")
    print(f"\npruners: {', '.join(list_pruners())}")
    print(f"allocations: {', '.join(list_allocations())}")
    from starfish.repair import list_repairs

    print(f"repairs: auto (default), {', '.join(list_repairs())}")
    from starfish.heal.objectives import OBJECTIVES

    print(f"healers: {', '.join(n + (' (uses labels)' if OBJECTIVES[n].uses_labels else '') for n in list_healers())}, none")
    from starfish.tasks import list_tasks

    print(f"evaluation tasks: {', '.join(list_tasks())}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from starfish.experiments.demo import run_demo

    run_demo(sparsity=args.sparsity, seed=args.seed, retrain=args.retrain)
    return 0


def _compare_setup(parser: argparse.ArgumentParser) -> None:
    add_run_flags(parser, skip=COMPARE_SKIPS)
    parser.add_argument("--sparsities", dest="_sparsities", metavar="S1,S2,...", type=floats_arg, default=[0.5, 0.75, 0.9], help="comma-separated sparsities (default 0.5,0.75,0.9)")
    parser.add_argument(
        "--healers",
        dest="_healers",
        metavar="H1,H2,...",
        type=_names,
        default=None,
        help="comma-separated: none, repairs, trained healers, or REPAIR+HEALER "
        "(default: none, every repair, starfish, kd, nmse; add finetune (uses labels) explicitly)",
    )
    parser.add_argument("--allocations", dest="_allocations", metavar="A1,A2,...", type=_names, default=None, help="comma-separated allocations to compare (default: --allocation)")
    add_distributed_flag(parser)


def cmd_compare(args: argparse.Namespace) -> int:
    from starfish.experiments.compare import compare, default_healers
    from starfish.reporting.compare_report import glance_table

    config = config_from_args(args)
    if config.out is None:
        raise StarfishError("pass --out DIR for compare.json, compare.md and the plots.")
    from starfish.distributed import is_writer
    from starfish.experiments.launch import launched

    healers = args._healers if args._healers is not None else default_healers()
    with launched(args._distributed, config, "compare"):
        result = compare(config, args._sparsities, healers, args._allocations, command=_command_line())
        if not is_writer():
            return 0
    print(glance_table(result["rows"], result["protocol"]))
    print(f"wrote {config.out}/ (compare.json, compare.md, protocol.json, curves.json, PNG plots)")
    return 0


def add_distributed_flag(parser: argparse.ArgumentParser) -> None:
    """``--distributed``: a property of the launch (torchrun), never saved in config.json."""
    parser.add_argument(
        "--distributed", dest="_distributed", choices=["ddp", "fsdp"], default=None,
        help="one rank of 'torchrun --nproc-per-node N -m starfish ...': ddp (replicated model, data split) or fsdp (sharded parameters)",
    )


def _diagnose_setup(parser: argparse.ArgumentParser) -> None:
    add_run_flags(parser, only=DIAGNOSE_FLAGS)
    parser.add_argument("--shrinkage", dest="_shrinkage", type=non_negative_float, default=0.0, help="variance-matching shrinkage (0 = plain matching)")


def cmd_diagnose(args: argparse.Namespace) -> int:
    from starfish.experiments.diagnose import diagnose, render_rr_markdown, write_diagnosis

    config = config_from_args(args)
    if config.out is None:
        raise StarfishError("pass --out DIR for rr.json, rr.md and rr.png.")
    if "prune.sparsity" not in vars(args):
        raise StarfishError("pass --sparsity S, the sparsity each layer is pruned to on its own, e.g. --sparsity 0.9.")
    rows = diagnose(config, args._shrinkage)
    size = config.calib_size
    title = f"{config.model} at {config.prune.sparsity:g} sparsity per layer, {size or 'all'} calibration images"
    write_diagnosis(rows, Path(config.out), title, config.force)
    worst = max((r for r in rows if r["rr"] is not None), key=lambda r: r["rr"], default=None)
    amplified = sum(1 for r in rows if r["rr"] is not None and r["rr"] > 1)
    print(render_rr_markdown(rows, title))
    if worst:
        print(f"least repairable: {worst['layer']} (RR {worst['rr']:.3f}); {amplified} layer(s) where the repair amplifies damage")
    print(f"wrote {config.out}/ (rr.json, rr.md, rr.png)")
    return 0


def _evaluate_setup(parser: argparse.ArgumentParser) -> None:
    from starfish.zeroshot.catalog import choices_text

    parser.add_argument("target", metavar="TARGET", help="a starfish run output folder (language model) or hf:FOLDER")
    parser.add_argument("--tasks", dest="tasks", metavar="T1,T2,...", help=f"zero-shot tasks through lm-evaluation-harness: {choices_text()}")
    parser.add_argument("--eval-limit", dest="eval_limit", type=positive_int, help="score a seeded subset of this many items per task (default all)")
    parser.add_argument("--tasks-data", dest="tasks_data", metavar="DIR", help="folder of the task files (default $STARFISH_TASKS_DATA, else ../shared/data/zeroshot)")
    parser.add_argument("--eval", dest="texts", metavar="TEXT", action="append", default=[], help="a text to score perplexity on (repeatable: one row per text)")
    parser.add_argument("--eval-size", dest="eval_size", type=positive_int, help="perplexity windows per text (default all)")
    parser.add_argument("--eval-seq-len", dest="eval_seq_len", type=positive_int, help="tokens per perplexity window (default the model's context, at most 2048)")
    parser.add_argument("--seed", dest="seed", type=seed_arg, default=0, help="seed of the task subsets (default 0)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, help="lm-eval batch size (default 16)")
    parser.add_argument("--dtype", dest="dtype", choices=["float32", "bfloat16", "float16"], help="precision the model is loaded in (default float32)")
    parser.add_argument("--device", dest="device", type=device_arg, default="auto", help="auto (default), cpu, cuda, ...")
    parser.add_argument("--out", dest="out", help="output directory for evaluate.json and evaluate.md")
    parser.add_argument("--force", dest="force", action="store_true", help="replace an output directory starfish wrote")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from starfish.experiments.evaluate_saved import EvaluateConfig, evaluate, render

    names = ("target", "tasks", "eval_limit", "tasks_data", "texts", "eval_size", "eval_seq_len", "seed", "batch_size", "dtype", "device", "out", "force")
    record = evaluate(EvaluateConfig(**{k: getattr(args, k) for k in names}), command=_command_line())
    print(render(record))
    print(f"wrote {args.out}/ (evaluate.json, evaluate.md)")
    return 0


def _command_line() -> str:
    return "starfish " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# Subcommands beside run/demo/models: name -> (help, setup(parser), handler)
EXTRA_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = [
    ("compare", "healers x sparsities side by side on one model: compare.json, compare.md, plots", _compare_setup, cmd_compare),
    ("diagnose", "Relative Repairability of every prunable layer: rr.json, rr.md, rr.png", _diagnose_setup, cmd_diagnose),
    ("evaluate", "score a saved language model: zero-shot tasks (lm-eval) and perplexity texts", _evaluate_setup, cmd_evaluate),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="starfish", description="Prune trained networks and heal them without labels.")
    from starfish.version import __version__

    parser.add_argument("--version", action="version", version=f"starfish {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    run_p = sub.add_parser("run", help="prune -> heal -> evaluate, writing model, masks and reports")
    add_run_flags(run_p)
    add_distributed_flag(run_p)
    run_p.set_defaults(handler=cmd_run)
    demo_p = sub.add_parser("demo", help="offline end-to-end demo on scikit-learn's handwritten digits")
    demo_p.add_argument("--sparsity", type=float, default=0.8)
    demo_p.add_argument("--seed", type=int, default=0)
    demo_p.add_argument("--retrain", action="store_true", help="retrain the cached dense demo network")
    demo_p.set_defaults(handler=cmd_demo)
    models_p = sub.add_parser("models", help="list built-in models, pruners, allocations and healers")
    models_p.set_defaults(handler=cmd_models)
    for name, help_text, setup, handler in EXTRA_COMMANDS:
        p = sub.add_parser(name, help=help_text)
        setup(p)
        p.set_defaults(handler=handler)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds (and cleans up) exactly like Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run one command. User errors print one line and exit 2; interrupts (Ctrl-C, SIGTERM) exit
    130/143 with scratch cleaned and any earlier output untouched; anything else is a bug and keeps
    its traceback."""
    from starfish.experiments.launch import RankFailure
    from starfish.common.outputs import protect_inputs, release_all_output_locks

    with sigterm_handled_by(_raise_terminated):
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            protect_inputs(getattr(args, "_config", None))  # --out may not replace the config file it reruns
            return int(args.handler(args) or 0)
        except StarfishError as exc:
            sys.stderr.write(f"starfish: error: {str(exc).replace(chr(10), ' ')}\n")
            return 2
        except RankFailure as exc:  # one rank of a torchrun launch: one line; torchrun stops the others
            sys.stderr.write(f"starfish: error: {exc}\n")
            return 1
        except KeyboardInterrupt as exc:
            name = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            sys.stderr.write(f"starfish: {name}; no new output was written and earlier results are unchanged.\n")
            return 143 if isinstance(exc, Terminated) else 130
        finally:
            release_all_output_locks()
            protect_inputs()


if __name__ == "__main__":
    raise SystemExit(main())
