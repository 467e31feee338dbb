"""``starfish evaluate``: score a saved language model without rerunning anything.

TARGET is a ``starfish run`` output folder (its ``model/`` Hugging Face folder is scored) or
``hf:FOLDER`` (any causal LM, e.g. the dense model). Zero-shot tasks go through
lm-evaluation-harness (``starfish.zeroshot``); each ``--eval`` text is scored for perplexity with
the literature's window protocol (``starfish.data.text.evaluation_windows``). Everything that can be
checked (the extra, task names and files, texts, the output folder) is checked before the model is
loaded; the output folder appears complete or not at all.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from starfish.errors import StarfishError
from starfish.data.text import text_name
from starfish.zeroshot import ZeroShot


@dataclass
class EvaluateConfig:
    target: str
    tasks: list[str] | str | None = None
    eval_limit: int | None = None
    tasks_data: str | None = None
    texts: list[str] = field(default_factory=list)  # perplexity texts (--eval, repeatable)
    eval_size: int | None = None  # windows per text (None: all)
    eval_seq_len: int | None = None  # tokens per window (None: the model's context, at most 2048)
    seed: int = 0
    batch_size: int | None = None  # lm-eval batch size
    dtype: str | None = None
    device: str = "auto"
    out: str | None = None
    force: bool = False


def model_folder(target: str) -> Path:
    """The Hugging Face folder TARGET names: ``hf:FOLDER``, or a run output's ``model/``."""
    if target.startswith("hf:"):
        folder = Path(target[3:])
        if not (folder / "config.json").is_file():
            raise StarfishError(f"{folder} is not a Hugging Face model folder (no config.json); pass hf:FOLDER made with save_pretrained.")
        return folder
    folder = Path(target)
    if (folder / "model" / "config.json").is_file():
        return folder / "model"
    if (folder / "model.safetensors").is_file():
        raise StarfishError(f"{folder} holds an image model; starfish evaluate scores language models (causal LM run outputs or hf:FOLDER).")
    raise StarfishError(f"{folder} is neither a starfish run output with a model/ folder nor hf:FOLDER; pass one of them.")


def check(config: EvaluateConfig) -> tuple[Path, ZeroShot | None, dict[str, str]]:
    """Everything knowable before loading the model."""
    from starfish.models.causal_lm import is_causal_lm
    from starfish.common.outputs import check_output_dir
    from starfish.data.text import text_files

    if not config.tasks and not config.texts:
        raise StarfishError("nothing to score: pass --tasks (e.g. lambada,piqa,arc_easy or standard) and/or --eval TEXT.")
    if config.out is None:
        raise StarfishError("pass --out DIR for evaluate.json and evaluate.md.")
    folder = model_folder(config.target)
    if not is_causal_lm(str(folder)):
        raise StarfishError(f"{folder} is not a causal language model; starfish evaluate scores causal LMs.")
    zeroshot = ZeroShot.check(config.tasks, config.tasks_data, config.eval_limit, config.seed, config.batch_size) if config.tasks else None
    taken: set[str] = set()
    texts = {}
    for path in config.texts:
        text_files(path)  # a missing or wrong-type text fails here
        texts[text_name(path, taken)] = path
    for flag, value in (("--eval-size", config.eval_size), ("--eval-seq-len", config.eval_seq_len)):
        if value is not None and value < (2 if flag == "--eval-seq-len" else 1):
            raise StarfishError(f"{flag} must be a whole number >= {2 if flag == '--eval-seq-len' else 1}; got {value}.")
    check_output_dir(config.out, config.force, (folder, config.tasks_data, *config.texts))
    return folder, zeroshot, texts


def perplexities(model: torch.nn.Module, tokenizer, texts: dict[str, str], seq_len: int, size: int | None, device) -> dict[str, dict]:
    """Perplexity of ``model`` on each text (first ``size`` windows of ``seq_len`` tokens)."""
    from starfish.tasks.lm_eval import evaluate_lm
    from starfish.data.text import evaluation_windows

    out = {}
    for name, path in texts.items():
        windows = evaluation_windows(path, tokenizer, seq_len, size)
        metrics = evaluate_lm({"model": model}, windows.batches(1), device, reference=None)["model"]
        out[name] = {"perplexity": metrics["perplexity"], **windows.protocol()}
    return out


def evaluate(config: EvaluateConfig, command: str | None = None) -> dict:
    """Score TARGET; returns the record (also written to ``config.out``)."""
    from starfish.nn.device import resolve_device
    from starfish.models import create_model
    from starfish.models.causal_lm import tokenizer_of
    from starfish.common.outputs import atomic_output_dir, write_json

    folder, zeroshot, texts = check(config)
    started = time.perf_counter()
    loaded = create_model(f"hf:{folder}", dtype=config.dtype)
    device = resolve_device(config.device)
    model = loaded.module.to(device).eval()
    tokenizer = tokenizer_of(loaded.extra)
    record: dict = {"model": config.target, "model_folder": str(folder)}
    try:
        if zeroshot is not None:
            tasks = zeroshot.score("model", model, tokenizer)
            section = zeroshot.record()
            record.update({"tasks": tasks, **section["scores"]["model"], "protocol": section["protocol"]})
        if texts:
            seq_len = config.eval_seq_len or int(loaded.extra["seq_len"])
            record["perplexity"] = perplexities(model, tokenizer, texts, seq_len, config.eval_size, device)
    finally:
        if zeroshot is not None:
            zeroshot.close()
    record["seconds"] = time.perf_counter() - started
    record["command"] = command
    record["dtype"] = config.dtype or "float32"
    with atomic_output_dir(config.out, config.force) as scratch:
        write_json(scratch / "evaluate.json", record)
        (scratch / "evaluate.md").write_text(render(record))
    return record


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def render(record: dict) -> str:
    """evaluate.md: one table of tasks, one of texts, and the protocol."""
    from starfish.zeroshot.catalog import ZEROSHOT_TASKS

    lines = [f"# starfish evaluate: {record['model']}", ""]
    if "tasks" in record:
        lines += ["| task | metric | score | acc | acc_norm | items |", "|---|---|---|---|---|---|"]
        for name, m in record["tasks"].items():
            metric = ZEROSHOT_TASKS.get(name).headline
            extra = f" (perplexity {m['perplexity']:.2f})" if "perplexity" in m else ""
            lines.append(f"| {name} | {metric} | {_pct(m.get(metric))}{extra} | {_pct(m.get('acc'))} | {_pct(m.get('acc_norm'))} | {m['n']} |")
        lines += ["", f"Mean over these tasks: {_pct(record.get('mean'))}; mean over the papers' seven: {_pct(record.get('mean_paper7'))}."]
        p = record["protocol"]
        lines += ["", f"lm-evaluation-harness {p['lm_eval_version']}, zero-shot, limit {p['limit']} items per task (seed {p['seed']}), batch {p['batch_size']}, task files under `{p['data_dir']}`."]
    if "perplexity" in record:
        lines += ["", "| text | perplexity | windows x tokens | sha256 |", "|---|---|---|---|"]
        for name, m in record["perplexity"].items():
            lines.append(f"| {name} | {m['perplexity']:.2f} | {m['windows']} x {m['seq_len']} | `{m['sha256'][:12]}` |")
    lines += ["", f"Command: `{record.get('command')}`", ""]
    return "\n".join(lines)


def load_record(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "evaluate.json").read_text())
