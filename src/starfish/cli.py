"""The ``starfish`` command: run, demo, models (and more subcommands registered by modules).

Every flag maps onto a field of ``RunConfig``; ``--config FILE`` loads a saved config (for example
an earlier run's ``config.json``) and any flag given on the command line overrides it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from starfish.errors import StarfishError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line naming the fix."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def size_arg(text: str) -> float:
    """A count (200) or a fraction of the folder (0.004)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 200 or a fraction like 0.004, got '{text}'") from None
    return int(value) if value >= 1 and value == int(value) else value


def floats_arg(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


S = argparse.SUPPRESS

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
    ("--eval", "eval", dict(help="evaluation folder with one sub-folder per class")),
    ("--eval-size", "eval_size", dict(type=int, help="fixed, seeded, class-balanced evaluation subset (default all)")),
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
    ("--repair-shrinkage", "repair_shrinkage", dict(type=float, help="varmatch shrinkage > 0 keeps collapsed channels from being blown up")),
    ("--heal-from", "heal_from", dict(choices=["pruned", "dense-masked"], help="start healing from the pruner's weights (default) or dense x mask")),
    ("--healer", "heal.healer", dict(help="starfish (default), kd, nmse, finetune (uses labels) or none")),
    ("--epochs", "heal.epochs", dict(type=int)),
    ("--batch-size", "heal.batch_size", dict(type=int)),
    ("--lr", "heal.lr", dict(type=float)),
    ("--min-lr", "heal.min_lr", dict(type=float)),
    ("--optimizer", "heal.optimizer", dict(choices=["adam", "adamw", "sgd"])),
    ("--weight-decay", "heal.weight_decay", dict(type=float)),
    ("--max-steps", "heal.max_steps", dict(type=int)),
    ("--cache-dtype", "heal.cache_dtype", dict(choices=["float32", "float16", "bfloat16"])),
    ("--recompute-targets", "heal.recompute_targets", dict(action="store_true", help="run the dense model every step instead of caching its outputs")),
    ("--cache-device", "heal.cache_device", dict(help="where cached dense outputs live, e.g. cpu")),
    ("--train-mode", "heal.train_mode", dict(action="store_true", help="heal with dropout on")),
    ("--bn-mode", "heal.bn_mode", dict(choices=["train", "frozen"], help="BatchNorm while healing: batch statistics + re-estimated running stats (train, default) or eval-mode (frozen)")),
    ("--temperature", "heal.temperature", dict(type=float, help="softmax temperature of the kd healer (default 1)")),
    ("--device", "heal.device", dict(help="auto (default), cpu, cuda, cuda:1, ...")),
    ("--no-progress", "heal.progress", dict(action="store_false", help="hide progress bars")),
    ("--eval-batch-size", "eval_batch_size", dict(type=int)),
    ("--workers", "workers", dict(type=int, help="data-loader worker processes")),
    ("--out", "out", dict(help="output directory (refused if it exists unless --force)")),
    ("--force", "force", dict(action="store_true", help="replace an existing output directory")),
]


def add_run_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    for flag, dest, kwargs in RUN_FLAGS:
        if flag not in skip:
            if kwargs.get("action") is None and "choices" not in kwargs:
                kwargs = {"metavar": flag[2:].upper().replace("-", "_"), **kwargs}
            parser.add_argument(flag, dest=dest, default=S, **kwargs)


def config_from_args(args: argparse.Namespace):
    """Merge --config (if any) with the flags that were actually given."""
    from starfish.pipeline import RunConfig

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
    merged = RunConfig.from_dict(base).to_dict()
    for dest, value in given.items():
        if dest.startswith("_") or dest in ("command", "handler"):
            continue
        head, _, tail = dest.partition(".")
        if tail:
            section = merged.get(head) or {}
            section[tail] = value
            merged[head] = section
        else:
            merged[dest] = value
    return RunConfig.from_dict(merged)


def cmd_run(args: argparse.Namespace) -> int:
    from starfish.pipeline import run
    from starfish.report import render_markdown

    config = config_from_args(args)
    if config.out is None:
        raise StarfishError("pass --out DIR for the healed model, masks and reports.")
    report = run(config, command="starfish " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    print(render_markdown(report).split("\n## Protocol")[0])
    print(f"wrote {config.out}/ (model.safetensors, masks.safetensors, config.json, report.json, report.md)")
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
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from starfish.demo import run_demo

    run_demo(sparsity=args.sparsity, seed=args.seed, retrain=args.retrain)
    return 0


# Subcommands contributed by other modules: name -> (setup(parser), handler)
EXTRA_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


def _compare_setup(parser: argparse.ArgumentParser) -> None:
    from starfish.compare import add_compare_flags

    add_compare_flags(parser)


def _compare_handler(args: argparse.Namespace) -> int:
    from starfish.compare import cmd_compare

    return cmd_compare(args)


EXTRA_COMMANDS.append(
    ("compare", "healers x sparsities side by side on one model: compare.json, compare.md, plots", _compare_setup, _compare_handler)
)


def _diagnose_setup(parser: argparse.ArgumentParser) -> None:
    from starfish.diagnose import setup_parser

    setup_parser(parser)


def _diagnose_handler(args: argparse.Namespace) -> int:
    from starfish.diagnose import cmd_diagnose

    return cmd_diagnose(args)


EXTRA_COMMANDS.append(
    ("diagnose", "Relative Repairability of every prunable layer: rr.json, rr.md, rr.png", _diagnose_setup, _diagnose_handler)
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="starfish", description="Prune trained networks and heal them without labels.")
    from starfish import __version__

    parser.add_argument("--version", action="version", version=f"starfish {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    run_p = sub.add_parser("run", help="prune -> heal -> evaluate, writing model, masks and reports")
    add_run_flags(run_p)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except StarfishError as exc:
        sys.stderr.write(f"starfish: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("starfish: interrupted; no output was written.\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
