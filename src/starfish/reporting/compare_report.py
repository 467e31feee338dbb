"""What ``starfish compare`` leaves behind: compare.json, compare.md, protocol.json, curves.json, PNGs.

compare.md is meant to be read at a glance (a healers x sparsities table with the best label-free
healer in bold, then the plots) and to be enough on its own to reproduce the numbers (protocol).
"""

from __future__ import annotations

from pathlib import Path

from starfish.common.outputs import atomic_output_dir, write_json
from starfish.reporting.report import pct

PLOTS = {
    "accuracy_vs_sparsity.png": "Top-1 accuracy against sparsity",
    "block_alignment.png": "Per-block cosine alignment with the dense model, before and after healing",
    "loss_curves.png": "Healing loss curves (each divided by its first value)",
}


def _label(healer: str, uses_labels: bool) -> str:
    return f"{healer} **(uses labels)**" if uses_labels else healer


def _columns(rows: list[dict]) -> list[tuple[str, float]]:
    return list(dict.fromkeys((r["allocation"], r["sparsity"]) for r in rows))


def _metric(protocol: dict) -> str:
    return protocol.get("metric", "top1")


def _value(row: dict, metric: str) -> str:
    """A cell: top-1 with its share of dense, or a perplexity."""
    if metric == "top1":
        return f"{pct(row['top1'])} ({pct(row['recovered_fraction'])})"
    value = row.get(metric)
    return "—" if value is None else f"{value:.2f}"


def glance_table(rows: list[dict], protocol: dict) -> str:
    """Healers down, sparsities across: top-1 (share of dense), or perplexity for language models.
    The best label-free healer per column in bold."""
    metric = _metric(protocol)
    better = max if metric == "top1" else min
    cols = _columns(rows)
    many = len({a for a, _ in cols}) > 1
    head = [f"{a} {100 * s:g}%" if many else f"{100 * s:g}%" for a, s in cols]
    cell = {(r["healer"], r["allocation"], r["sparsity"]): r for r in rows}
    best = {}
    for a, s in cols:
        free = [r for r in rows if r["allocation"] == a and r["sparsity"] == s and not r["uses_labels"] and r.get(metric) is not None]
        if free:
            best[(a, s)] = better(r[metric] for r in free)
    dense = pct(protocol.get("dense_top1")) if metric == "top1" else _value({metric: protocol.get(f"dense_{metric}")}, metric)
    lines = [
        "| healer | " + " | ".join(head) + " |",
        "|---|" + "---|" * len(cols),
        "| dense | " + " | ".join(dense for _ in cols) + " |",
    ]
    for healer in dict.fromkeys(r["healer"] for r in rows):
        parts = []
        for a, s in cols:
            r = cell.get((healer, a, s))
            if r is None:
                parts.append("—")
                continue
            text = _value(r, metric)
            if not r["uses_labels"] and r.get(metric) is not None and r[metric] == best.get((a, s)):
                text = f"**{text}**"
            parts.append(text)
        uses = any(r["uses_labels"] for r in rows if r["healer"] == healer)
        lines.append(f"| {_label(healer, uses)} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def language_table(rows: list[dict], protocol: dict) -> list[str]:
    """Language models: perplexity on every further --eval text and zero-shot accuracy per task, a row per model."""
    dense = protocol.get("dense_scores")
    if not dense:
        return []
    from starfish.zeroshot.catalog import ZEROSHOT_TASKS

    texts = list(dense.get("perplexity_texts", {}))
    tasks = list(dense.get("zeroshot", {}).get("tasks", {}))
    head = [f"perplexity {t}" for t in texts] + [f"{t} ({ZEROSHOT_TASKS.get(t).headline})" for t in tasks] + (["zero-shot mean"] if tasks else [])
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]

    def cells(scores: dict) -> str:
        ppl = [f"{scores.get('perplexity_texts', {}).get(t, float('nan')):.2f}" for t in texts]
        zs = scores.get("zeroshot", {})
        acc = [pct(zs.get("tasks", {}).get(t, {}).get(ZEROSHOT_TASKS.get(t).headline)) for t in tasks]
        return " | ".join(ppl + acc + ([pct(zs.get("mean"))] if tasks else []))

    lines.append(f"| dense | {cells(dense)} |")
    for r in rows:
        lines.append(f"| {r['healer']} at {100 * r['sparsity']:g}% ({r['allocation']}) | {cells(r)} |")
    limit = (protocol.get("zeroshot") or {}).get("limit")
    note = f" Zero-shot through lm-evaluation-harness on {'all items' if limit is None else f'a seeded subset of {limit} items per task'}." if tasks else ""
    return ["## Further texts and zero-shot tasks", "", *lines, "", f"Higher is better for accuracy, lower for perplexity.{note}", ""]


def full_table(rows: list[dict], metric: str = "top1") -> str:
    score = "top-1 | of dense" if metric == "top1" else metric
    lines = [
        f"| allocation | sparsity | healer | kind | {score} | agreement | KL(dense ‖ model) | mean block cosine | seconds | steps | labels |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if metric == "top1" else ""),
    ]
    for r in rows:
        value = f"{pct(r['top1'])} | {pct(r['recovered_fraction'])}" if metric == "top1" else _value(r, metric)
        lines.append(
            f"| {r['allocation']} | {100 * r['sparsity']:g}% (achieved {100 * r['achieved_sparsity']:.2f}%) | {r['healer']} | {r['kind']} | "
            f"{value} | {pct(r['agreement'])} | {r['kl']:.4f} | "
            f"{r['block_cosine_mean']:.4f} | {r['heal_seconds']:.1f} | {r['steps']} | {'**yes**' if r['uses_labels'] else 'no'} |"
        )
    return "\n".join(lines)


def protocol_lines(p: dict) -> list[str]:
    cal, ev, budget = p["calibration"], p["eval"], p["heal_budget"]
    steps = f"at most {budget['max_steps']} steps" if budget.get("max_steps") else f"{budget['epochs']} epochs over the calibration set"
    if _metric(p) == "top1":
        pre = p["preprocess"]
        head = [
            f"- Model: `{p['model']}`, weights `{p['weights']}` (sha256 `{p['weights_sha256']}`); "
            f"dense top-1 {pct(p['dense_top1'])} on the evaluation images below.",
            f"- Preprocessing: {pre['input_size']}px, resize {pre['resize']}, {pre['interpolation']}, mean {pre['mean']}, std {pre['std']}.",
        ]
        data = [
            f"- Calibration: {cal['size']} images from `{cal['source']}`, {cal['sampling']} (seed {cal['seed']}); "
            f"labels are given only to healers marked *uses labels*.",
            f"- Evaluation: {ev['size']} images from `{ev['source']}`, class-balanced subset (seed {ev['seed']}); "
            f"identical images for every row. Block alignment is measured on {p['alignment_images']['size']} of them "
            "(seeded random subset, labels unused).",
        ]
    else:
        head = [f"- Model: `{p['model']}`; dense perplexity {p['dense_perplexity']:.2f} on the evaluation windows below."]
        data = [
            f"- Calibration: {cal['size']} sequences of {cal.get('seq_len')} tokens from `{cal['source']}`, {cal['sampling']} (seed {cal['seed']}).",
            f"- Evaluation: the first {ev['windows']} non-overlapping windows of {ev['seq_len']} tokens ({ev['tokens']} tokens) of "
            f"`{ev['source']}` (sha256 `{ev['text_sha256']}`); perplexity = exp(mean next-token NLL); identical windows for "
            f"every row. Block alignment is measured on {p['alignment_images']['from']}.",
        ]
    return head + [
        f"- Pruning: `{p['pruner']}` scores, allocations {', '.join(p['allocations'])}, sparsities "
        f"{', '.join(f'{100 * s:g}%' for s in p['sparsities'])} of {p['prunable_weights']} prunable weights "
        f"(pruning settings {p['prune']}), pruned once per cell; every healer starts from a deep copy "
        "of those exact weights and masks (`start_sha256` in compare.json).",
        f"- Blocks ({len(p['blocks'])}): {', '.join(f'`{b}`' for b in p['blocks'])}.",
        *data,
        f"- Shared healing budget for every trained healer: {budget['optimizer']}, lr {budget['lr']} → {budget['min_lr']} "
        f"(cosine per step), batch {budget['batch_size']}, {steps}, weight decay {budget['weight_decay']}, "
        f"train mode {budget['train_mode']}, BatchNorm {budget.get('bn_mode', 'frozen (eval mode)')}, kd temperature {budget['temperature']}, cached targets {budget['cache_dtype']}, "
        f"seed {p['seed']}, device {budget['device']}.",
        "- Software: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items()) + ".",
    ]


def _caption(metric: str) -> str:
    if metric == "top1":
        return "Top-1 accuracy (share of dense top-1 in brackets). Bold: the best healer that uses no labels, per column."
    return f"{metric.capitalize()} (lower is better). Bold: the best healer that uses no labels, per column."


def render_markdown(result: dict, plots: list[str]) -> str:
    rows, p = result["rows"], result["protocol"]
    lines = [
        f"# starfish compare — {p['model']}",
        "",
        _caption(_metric(p)),
        "`none` = pruned, not healed. Rows marked *uses labels* are supervised and not a like-for-like comparison.",
        "",
        glance_table(rows, p),
        "",
        *language_table(rows, p),
    ]
    for name in plots:
        caption = PLOTS.get(name, name) if name != "accuracy_vs_sparsity.png" or _metric(p) == "top1" else f"{_metric(p).capitalize()} against sparsity"
        lines += [f"![{caption}]({name})", ""]
    lines += ["## Protocol", ""] + protocol_lines(p)
    if p.get("command"):
        lines += ["", "Command:", "", "```", p["command"], "```"]
    lines += ["", "## All rows", "", full_table(rows, _metric(p)), ""]
    return "\n".join(lines)


def make_plots(result: dict, folder: Path) -> list[str]:
    """Write the PNGs; a plotting failure is reported but never costs the numbers."""
    from starfish.reporting import plots

    rows, p, curves = result["rows"], result["protocol"], result["curves"]
    uses = {r["healer"]: r["uses_labels"] for r in rows}
    many = len(p["allocations"]) > 1
    title = lambda c: (f"{c['allocation']} " if many else "") + f"{100 * c['sparsity']:g}% sparsity"  # noqa: E731
    jobs = {
        "accuracy_vs_sparsity.png": lambda path: plots.accuracy_vs_sparsity(
            rows, p.get(f"dense_{_metric(p)}"), path, p["model"], _metric(p)
        ),
        "block_alignment.png": lambda path: plots.block_alignment(
            [(title(c), {"pruned, before healing": c["alignment_before"], **{h: v["alignment_after"] for h, v in c["healers"].items() if h != "none"}}) for c in curves],
            path,
            uses,
        ),
        "loss_curves.png": lambda path: plots.loss_curves(
            [(title(c), {h: v["loss"] for h, v in c["healers"].items() if v["loss"]}) for c in curves], path, relative=True, uses_labels=uses
        ),
    }
    if not any(v["loss"] for c in curves for v in c["healers"].values()):
        del jobs["loss_curves.png"]  # nothing was trained
    return plots.draw_each(list(jobs.items()), folder)


def write_outputs(result: dict, out: str | Path, force: bool = False) -> None:
    with atomic_output_dir(out, force) as scratch:
        write_json(scratch / "compare.json", result["rows"])
        write_json(scratch / "protocol.json", result["protocol"])
        write_json(scratch / "curves.json", result["curves"])
        made = make_plots(result, scratch)
        (scratch / "compare.md").write_text(render_markdown(result, made))
