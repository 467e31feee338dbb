"""Zero-shot scoring through lm-evaluation-harness, offline, on local task files.

``prepare_tasks`` writes, for every task, the records lm-eval's own definition reads (a seeded
subset when ``limit`` is set) as a JSON-lines file and a task YAML that includes lm-eval's
definition and only replaces where its data comes from. The folder is a valid lm-eval
``--include_path``: ``lm_eval --model hf --model_args pretrained=FOLDER --include_path TASKS
--tasks piqa`` scores exactly the same items with exactly the same prompts, which is how the tests
check starfish against lm-eval's own command line. ``score`` runs an already-loaded model on them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from starfish.errors import StarfishError
from starfish.models.registry import sha256_of
from starfish.zeroshot.catalog import PAPER_SEVEN, ZEROSHOT_TASKS

EXTRA = "pip install 'starfish-heal[eval]'"
TASKS_DATA_ENV = "STARFISH_TASKS_DATA"
DEFAULT_TASKS_DATA = Path("..") / "shared" / "data" / "zeroshot"
DEFAULT_BATCH_SIZE = 16
METRICS = ("acc", "acc_norm", "perplexity")


def require_harness() -> None:
    """lm-eval is an optional extra: its absence is one line naming the extra, before any work."""
    if importlib.util.find_spec("lm_eval") is None:
        raise StarfishError(f"zero-shot scoring needs lm-evaluation-harness, which is not installed; {EXTRA}.")


def tasks_data_dir(given: str | None) -> Path:
    """Where the task files are: ``--tasks-data``, else $STARFISH_TASKS_DATA, else ../shared/data/zeroshot."""
    return Path(given or os.environ.get(TASKS_DATA_ENV) or DEFAULT_TASKS_DATA)


def check_task_files(names: list[str], data_dir: Path) -> None:
    """Every file every task reads exists (checked before any model is loaded)."""
    for name in names:
        for rel in ZEROSHOT_TASKS.get(name).files:
            if not (data_dir / rel).is_file():
                raise StarfishError(
                    f"task '{name}' needs {data_dir / rel}, which does not exist; point --tasks-data "
                    f"(or ${TASKS_DATA_ENV}) at the folder that holds {Path(rel).parent}/."
                )


def subset(count: int, limit: int | None, seed: int) -> list[int]:
    """Which items are scored: all, or ``limit`` of them drawn with ``seed`` (in file order)."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


@dataclass
class PreparedTasks:
    """A folder lm-eval can include, and what was put in it."""

    folder: Path
    names: list[str]
    protocol: dict = field(default_factory=dict)  # per task: source files' sha256, items, subset file's sha256


def _definition_path(name: str) -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent / ZEROSHOT_TASKS.get(name).definition


def task_yaml(name: str, records: Path, cache: Path) -> str:
    """lm-eval's definition of ``name``, fed from ``records`` (one split; nothing else is loaded)."""
    task = ZEROSHOT_TASKS.get(name)
    splits = {"training_split": None, "validation_split": None, "test_split": None, "fewshot_split": None}
    splits["test_split" if task.split == "test" else "validation_split"] = task.split
    config = {
        "include": str(_definition_path(name)),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(records)}, "cache_dir": str(cache)},
        **splits,
    }
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in config.items()) + "\n"  # JSON values are YAML


def prepare_tasks(names: list[str], data_dir: Path, folder: Path, limit: int | None, seed: int) -> PreparedTasks:
    """Write each task's (subset of) records and its YAML into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    prepared = PreparedTasks(folder, list(names))
    for name in names:
        task = ZEROSHOT_TASKS.get(name)
        sources = [data_dir / rel for rel in task.files]
        docs = task.read(sources)
        picks = subset(len(docs), limit, seed)
        records = folder / f"{name}.jsonl"
        records.write_text("".join(json.dumps(docs[i], ensure_ascii=False) + "\n" for i in picks), encoding="utf-8")
        (folder / f"{name}.yaml").write_text(task_yaml(name, records.resolve(), (folder / "datasets_cache").resolve()))
        prepared.protocol[name] = {
            "files": {str(rel): sha256_of(path) for rel, path in zip(task.files, sources)},
            "items": len(picks),
            "of": len(docs),
            "subset_sha256": sha256_of(records),
            "split": task.split,
            "metric": task.headline,
        }
    return prepared


def _offline() -> None:
    """Nothing may be fetched: datasets and the hub read local files only."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


@torch.no_grad()
def score(model: nn.Module, tokenizer, prepared: PreparedTasks, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, dict]:
    """``{task: {"acc", "acc_norm" (where defined), "perplexity" (LAMBADA), "n"}}`` for ``model``.

    The model is scored as it is (its device and dtype, eval mode); lm-eval's sampling seeds are its
    defaults, and zero-shot multiple-choice scoring draws nothing at random."""
    require_harness()
    _offline()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for noisy in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=str(prepared.folder))
        results = simple_evaluate(
            model=lm, tasks=list(prepared.names), task_manager=manager, num_fewshot=0,
            log_samples=False, bootstrap_iters=0, verbosity="ERROR",
        )
    finally:
        model.train(was_training)
    return {name: task_metrics(results, name) for name in prepared.names}


def task_metrics(results: dict, name: str) -> dict:
    """Our record of one task from lm-eval's results (``"acc,none"`` -> ``"acc"``)."""
    raw = results["results"][name]
    out = {metric: float(raw[f"{metric},none"]) for metric in METRICS if f"{metric},none" in raw}
    out["n"] = int(results.get("n-samples", {}).get(name, {}).get("effective", 0))
    return out


def headline(name: str, metrics: dict) -> float | None:
    return metrics.get(ZEROSHOT_TASKS.get(name).headline)


def means(tasks: dict[str, dict]) -> dict[str, float | None]:
    """The mean headline accuracy over the scored tasks, and over the papers' seven when all were scored."""
    values = [headline(n, m) for n, m in tasks.items()]
    values = [v for v in values if v is not None]
    seven = [headline(n, tasks[n]) for n in PAPER_SEVEN if n in tasks]
    return {
        "mean": sum(values) / len(values) if values else None,
        "mean_paper7": sum(seven) / len(seven) if len(seven) == len(PAPER_SEVEN) and None not in seven else None,
    }
