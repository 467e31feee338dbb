"""The zero-shot tasks of LLM-pruning papers, read from local files into the fields lm-eval reads.

lm-evaluation-harness defines each task (prompt, choices, metrics) over a Hugging Face dataset. The
task files starfish scores come from other public copies in other layouts (``../shared/data/zeroshot``,
see its README), so every task here names its files and a reader that turns them into exactly the
records lm-eval's own task definition reads (``question``/``choices``/``answerKey`` for ARC, ...).
lm-eval's definition is then used unchanged, only pointed at those records; nothing is downloaded.

``headline`` is the metric pruning papers average (acc_norm for HellaSwag, ARC and OpenBookQA, acc
elsewhere).
"""

from __future__ import annotations

import bz2
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starfish.errors import StarfishError
from starfish.registry import Registry

Reader = Callable[[list[Path]], list[dict]]


@dataclass(frozen=True)
class ZeroShotTask:
    name: str  # lm-eval's task name
    files: tuple[str, ...]  # paths under the tasks data folder that the reader takes, in order
    definition: str  # lm-eval's task YAML, relative to lm_eval/tasks
    split: str  # the split lm-eval scores this task on
    headline: str  # the metric papers report: acc or acc_norm
    read: Reader


ZEROSHOT_TASKS: Registry[ZeroShotTask] = Registry("zero-shot task", "or a set: standard, paper7")

# The mean pruning papers report, and what `standard` adds for small models (they sit near chance
# on ARC-c, BoolQ and RTE; LAMBADA and PIQA separate them).
PAPER_SEVEN = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
TASK_SETS = {"standard": ("lambada_openai", "piqa", *PAPER_SEVEN), "paper7": PAPER_SEVEN}
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge", "obqa": "openbookqa"}


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise StarfishError(f"{path}:{number} is not valid JSON ({exc.msg}); restore the task file.") from None
    return rows


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _paired(rows: list[dict], labels: list[str], path: Path) -> list[tuple[dict, str]]:
    if len(rows) != len(labels):
        raise StarfishError(f"{path} has {len(labels)} labels for {len(rows)} items; restore the task files.")
    return list(zip(rows, labels))


def read_lambada(files: list[Path]) -> list[dict]:
    return [{"text": row["text"]} for row in _jsonl(files[0])]


def read_piqa(files: list[Path]) -> list[dict]:
    pairs = _paired(_jsonl(files[0]), _labels(files[1]), files[1])
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)} for r, label in pairs]


def _choices(question: dict) -> dict:
    return {"text": [c["text"] for c in question["choices"]], "label": [c["label"] for c in question["choices"]]}


def read_arc(files: list[Path]) -> list[dict]:
    return [
        {"id": r["id"], "question": r["question"]["stem"], "choices": _choices(r["question"]), "answerKey": r["answerKey"]}
        for r in _jsonl(files[0])
    ]


def read_openbookqa(files: list[Path]) -> list[dict]:
    return [
        {"id": r["id"], "question_stem": r["question"]["stem"], "choices": _choices(r["question"]), "answerKey": r["answerKey"]}
        for r in _jsonl(files[0])
    ]


HELLASWAG_LINES = 6  # "activity: context", gold index, four endings


def read_hellaswag(files: list[Path]) -> list[dict]:
    """The text export holds each item's query already joined ("activity: context"); it is split
    back at the first ': ' so lm-eval's own preprocessing rebuilds the same query."""
    lines = bz2.decompress(files[0].read_bytes()).decode("utf-8").split("\n")
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) % HELLASWAG_LINES:
        raise StarfishError(f"{files[0]} does not hold {HELLASWAG_LINES} lines per item; restore the task file.")
    docs = []
    for start in range(0, len(lines), HELLASWAG_LINES):
        query, gold, *endings = lines[start : start + HELLASWAG_LINES]
        activity, _, context = query.partition(": ")
        docs.append({"activity_label": activity, "ctx_a": context, "ctx_b": "", "endings": endings, "label": gold.strip()})
    return docs


def read_winogrande(files: list[Path]) -> list[dict]:
    pairs = _paired(_jsonl(files[0]), _labels(files[1]), files[1])
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": label} for r, label in pairs]


def read_boolq(files: list[Path]) -> list[dict]:
    labels = {"true": 1, "false": 0, True: 1, False: 0}
    return [{"question": r["question"], "passage": r["passage"], "label": labels[r["label"]], "idx": r["idx"]} for r in _jsonl(files[0])]


def read_rte(files: list[Path]) -> list[dict]:
    """GLUE's RTE validation split (label 0 = entailment), from its tab-separated export."""
    import csv

    with files[0].open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence1": r["sentence1"], "sentence2": r["sentence2"], "label": int(r["label"]), "idx": int(r["idx"])} for r in rows]


for _task in (
    ZeroShotTask("lambada_openai", ("lambada_openai/lambada_test.jsonl",), "lambada/lambada_openai.yaml", "test", "acc", read_lambada),
    ZeroShotTask("piqa", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "piqa/piqa.yaml", "validation", "acc", read_piqa),
    ZeroShotTask("arc_easy", ("arc/ARC-Easy-Test.jsonl",), "arc/arc_easy.yaml", "test", "acc_norm", read_arc),
    ZeroShotTask("arc_challenge", ("arc/ARC-Challenge-Test.jsonl",), "arc/arc_challenge.yaml", "test", "acc_norm", read_arc),
    ZeroShotTask("hellaswag", ("hellaswag/hellaswag_val_full.txt.bz2",), "hellaswag/hellaswag.yaml", "validation", "acc_norm", read_hellaswag),
    ZeroShotTask("winogrande", ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), "winogrande/default.yaml", "validation", "acc", read_winogrande),
    ZeroShotTask("boolq", ("boolq/superglue_BoolQ_val.jsonl",), "super_glue/boolq/default.yaml", "validation", "acc", read_boolq),
    ZeroShotTask("openbookqa", ("openbookqa/test.jsonl",), "openbookqa/openbookqa.yaml", "test", "acc_norm", read_openbookqa),
    ZeroShotTask("rte", ("rte/glue_rte_validation_hf_export.tsv",), "glue/rte/default.yaml", "validation", "acc", read_rte),
):
    ZEROSHOT_TASKS.add(_task.name, _task)


def resolve_task_names(names: list[str] | str) -> list[str]:
    """lm-eval task names from a user's list: sets (``standard``, ``paper7``) expand, aliases
    (``lambada``) resolve, duplicates and empty names are refused."""
    raw = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    if not raw or any(not n for n in raw):
        raise StarfishError(f"zero-shot tasks are comma-separated task names, e.g. lambada,piqa,arc_easy or standard; got '{','.join(raw)}'.")
    out: list[str] = []
    for name in raw:
        for task in TASK_SETS.get(name, (ALIASES.get(name, name),)):
            ZEROSHOT_TASKS.get(task)  # unknown names fail here, listing the choices
            if task in out:
                raise StarfishError(f"zero-shot task '{task}' is named twice; name each task once.")
            out.append(task)
    return out


def choices_text() -> str:
    return ", ".join([*TASK_SETS, *ZEROSHOT_TASKS.names()])
