"""Zero-shot task accuracy of causal LMs (LAMBADA, PIQA, ARC, HellaSwag, ...) through lm-evaluation-harness.

``ZeroShot`` is what ``run``, ``compare`` and ``evaluate`` share: the tasks are checked and their
records prepared once (``check`` before any model is loaded, ``open`` after), then every model
(dense, pruned, healed) is scored on the same items, and ``record`` gives the report section with its
protocol (lm-eval's version, every task file's sha256, the subset and the metric per task).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from starfish.zeroshot.catalog import PAPER_SEVEN, TASK_SETS, ZEROSHOT_TASKS, ZeroShotTask, resolve_task_names
from starfish.zeroshot.harness import (
    DEFAULT_BATCH_SIZE, PreparedTasks, check_task_files, harness_version, means, prepare_tasks, require_harness, score,
    tasks_data_dir,
)

__all__ = [
    "PAPER_SEVEN", "TASK_SETS", "ZEROSHOT_TASKS", "ZeroShot", "ZeroShotTask", "means", "prepare_tasks",
    "resolve_task_names", "score",
]


@dataclass
class ZeroShot:
    """The zero-shot tasks of one job, scored model after model on the same items."""

    names: list[str]
    data_dir: Path
    limit: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    scores: dict[str, dict[str, dict]] = field(default_factory=dict)  # label -> task -> metrics
    prepared: PreparedTasks | None = None
    _scratch: Path | None = None

    @classmethod
    def check(cls, tasks: list[str] | str, data_dir: str | None, limit: int | None, seed: int, batch_size: int | None = None) -> "ZeroShot":
        """Everything knowable before loading a model: the extra, the names, the files, the limit."""
        from starfish.errors import StarfishError

        require_harness()
        names = resolve_task_names(tasks)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise StarfishError(f"--eval-limit must be a whole number of items >= 1 per task; got {limit}.")
        folder = tasks_data_dir(data_dir)
        check_task_files(names, folder)
        return cls(names, folder, limit, seed, batch_size or DEFAULT_BATCH_SIZE)

    def open(self, folder: Path | None = None) -> PreparedTasks:
        """Write the task records (into ``folder``, else a scratch folder removed by ``close``)."""
        if self.prepared is None:
            if folder is None:
                self._scratch = folder = Path(tempfile.mkdtemp(prefix="starfish-zeroshot-"))
            self.prepared = prepare_tasks(self.names, self.data_dir, folder, self.limit, self.seed)
        return self.prepared

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch, self.prepared = None, None

    def score(self, label: str, model: nn.Module, tokenizer) -> dict[str, dict]:
        self.scores[label] = score(model, tokenizer, self.open(), self.batch_size)
        return self.scores[label]

    def protocol(self) -> dict:
        prepared = self.open()
        return {
            "engine": "lm-evaluation-harness",
            "lm_eval_version": harness_version(),
            "num_fewshot": 0,
            "limit": self.limit,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "data_dir": str(self.data_dir),
            "files": {name: p["files"] for name, p in prepared.protocol.items()},
            "tasks": prepared.protocol,
        }

    def record(self) -> dict:
        """The report section: per label, every task's metrics and the means; and the protocol."""
        return {
            "tasks": self.names,
            "scores": {label: {"tasks": tasks, **means(tasks)} for label, tasks in self.scores.items()},
            "protocol": self.protocol(),
        }
