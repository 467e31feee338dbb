"""Human-readable reports: the numbers side by side, and the protocol needed to reproduce them."""

from __future__ import annotations

import math

from starfish.reporting.run_plots import RUN_PLOTS as _PLOT_TITLES  # one list of plot titles


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _row_name(report: dict, label: str) -> str:
    if label == "dense_bn_reestimated":
        return "dense, BatchNorm re-estimated on the calibration set (control)"
    if label == "repaired":
        return f"repaired ({report.get('repair')})"
    if label == "healed":
        return f"healed ({report['healer']}{', uses labels' if report.get('uses_labels') else ''})"
    return label


def _fidelity_cells(report: dict, label: str) -> tuple[str, str]:
    f = report.get("fidelity_to_dense", {}).get(label, {})
    return (pct(f.get("agreement")), f"{f['kl']:.4f}") if f else ("—", "—")


def _score_table(report: dict) -> list[str]:
    """Top-1 for classifiers; perplexity (lower is better) for language models."""
    if "perplexity" in report:
        ppl = report["perplexity"]
        lines = ["| model | perplexity | next-token agreement with dense | KL(dense ‖ model) per token |", "|---|---|---|---|"]
        for label in ("dense", "pruned", "healed"):
            value = ppl.get(label)
            agree, kl = _fidelity_cells(report, label)
            lines.append(f"| {_row_name(report, label)} | {'—' if value is None else f'{value:.2f}'} | {agree} | {kl} |")
        return lines
    top1 = report["top1"]
    lines = ["| model | top-1 | of dense | agreement with dense | KL(dense ‖ model) |", "|---|---|---|---|---|"]
    dense = top1.get("dense")
    for label in ("dense", "dense_bn_reestimated", "pruned", "repaired", "healed"):
        if label in ("repaired", "dense_bn_reestimated") and top1.get(label) is None:
            continue
        acc = top1.get(label)
        share = pct(acc / dense) if acc is not None and dense else "—"
        agree, kl = _fidelity_cells(report, label)
        lines.append(f"| {_row_name(report, label)} | {pct(acc)} | {share} | {agree} | {kl} |")
    return lines


def _data_lines(report: dict) -> list[str]:
    cal, ev = report["calibration"], report["eval"]
    labels = f"labels not used{' — except by this healer' if report.get('uses_labels') else ''}"
    if "seq_len" in cal:
        return [
            f"- Calibration: {cal['size']} sequences of {cal['seq_len']} tokens from `{cal['source']}`, seed {cal['seed']} (padding never counts)",
            f"- Evaluation: first {ev.get('windows')} non-overlapping windows of {ev.get('seq_len')} tokens of `{ev['source']}` "
            f"(sha256 `{ev.get('text_sha256')}`, {ev.get('tokens')} tokens); perplexity = exp(mean next-token NLL)",
        ]
    return [
        f"- Calibration: {cal['size']} images from `{cal['source']}`, seed {cal['seed']} ({labels})",
        f"- Evaluation: {ev['size']} images from `{ev['source']}` (class-balanced, seed {ev['seed']})",
    ]


def _recovery_line(report: dict) -> str:
    """How much of the pruning loss healing won back, in the task's own terms."""
    ppl = report.get("perplexity")
    if ppl is None:
        return f"Recovered fraction (healed / dense top-1): **{pct(report.get('recovered_fraction'))}**."
    dense, pruned, healed = (ppl.get(k) for k in ("dense", "pruned", "healed"))
    if None in (dense, pruned, healed) or not math.isfinite(pruned) or not math.isfinite(healed) or not pruned > dense > 0:
        return "Gap closed by healing: **—**."
    closed = (math.log(pruned) - math.log(healed)) / (math.log(pruned) - math.log(dense))
    return f"Gap closed by healing (share of the pruned-to-dense log-perplexity gap): **{pct(closed)}**."


def _model_line(report: dict) -> str:
    if report.get("weights") is None and str(report["model"]).startswith("hf:"):  # the folder holds the weights
        return f"- Model: `{report['model']}` (weights from its folder)"
    return f"- Model: `{report['model']}`, weights `{report['weights']}` (sha256 `{report.get('weights_sha256')}`)"


def render_markdown(report: dict) -> str:
    lines = [f"# starfish report — {report['model']} at {pct(report['sparsity'])} sparsity", "", *_score_table(report)]
    heal = report.get("heal", {})
    lines += [
        "",
        _recovery_line(report) + " "
        f"Healing took {report['heal_seconds']:.1f} s"
        + (f" ({heal.get('steps')} steps); peak memory {report['peak_memory_mb']:.0f} MB ({report['memory_measure']})." if report.get("peak_memory_mb") else "."),
        "",
        *language_lines(report),
        *_plot_lines(report),
        *_budget_lines(report),
        *_pipeline_lines(report),
        "## Protocol",
        "",
        _model_line(report),
        f"- Pruning: {report['pruner']}, allocation {report['allocation']}, requested sparsity "
        f"{report['requested_sparsity']}, achieved {report['sparsity']:.6f} over {report['prunable_weights']} prunable weights"
        f"; label-free repair: {report.get('repair', 'none')}"
        + (f" (requested {report['repair_requested']}: {report.get('repair_reason')})" if report.get("repair_requested") == "auto" else ""),
        *_data_lines(report),
        f"- Healer `{report['healer']}`: optimizer {heal.get('optimizer')}, lr {heal.get('lr')} → {heal.get('min_lr')} (cosine per step), "
        f"batch {heal.get('batch_size')}, {_budget_text(heal)}, cache {heal.get('cache_dtype')}{_reason(heal)}, blocks {len(heal.get('blocks') or [])}",
        *_protocol_extras(report),
        "- Software: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
    ]
    if report.get("command"):
        lines += ["", "Command:", "", "```", report["command"], "```"]
    lines += _block_lines(report)
    lines += ["", "## Per-layer sparsity", "", "| weight | sparsity |", "|---|---|"]
    lines += [f"| `{k}` | {pct(v)} |" for k, v in report["layer_sparsity"].items()]
    return "\n".join(lines) + "\n"


def _block_lines(report: dict) -> list[str]:
    """The aligned blocks in forward order, where each one's stream was read, and how many of the
    prunable weights sit inside it (weights outside every block are counted on their own row)."""
    heal = report.get("heal", {})
    blocks = heal.get("blocks") or []
    if not blocks:
        return []
    points = heal.get("points") or []
    weights = list(report.get("layer_sparsity") or {})

    def inside(weight: str, block: str) -> bool:
        return weight.startswith(block + ".")

    lines = ["", "## Blocks (aligned, in forward order) and prunable weights", "", "| # | block | stream read at | prunable weights |", "|---|---|---|---|"]
    for i, block in enumerate(blocks):
        read_at = points[i] if i < len(points) else "its output"
        lines.append(f"| {i} | `{block}` | {read_at} | {sum(inside(w, block) for w in weights)} |")
    outside = [w for w in weights if not any(inside(w, b) for b in blocks)]
    if outside:
        lines.append(f"| — | outside every block | — | {len(outside)} |")
    return lines


def _budget_lines(report: dict) -> list[str]:
    """Budget auto: why healing stopped, which weights were kept, and the held-out curve."""
    stop = (report.get("heal") or {}).get("stopping")
    if not stop:
        return []

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.5g}"

    lines = [
        "## Healing budget (auto, label-free)",
        "",
        f"Stopped: {stop['reason']}. Kept the weights of epoch {num(stop.get('best_epoch'))} (step {stop.get('best_step')}), "
        f"the best held-out {stop['monitor']}; held-out data: {stop['holdout']}.",
        "",
        "| epoch | step | held-out objective | held-out KL(dense ‖ sparse) | improved |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {p['epoch']:g} | {p['step']} | {num(p['objective'])} | {num(p['kl'])} | {'yes' if p['improved'] else ''} |"
        for p in stop["curve"]
    ]
    return lines + [""]



def _pipeline_lines(report: dict) -> list[str]:
    """Pipeline auto: every candidate's short-heal held-out signal, and the one the run finished."""
    choice = report.get("pipeline") or {}
    if choice.get("mode") != "auto":
        return []
    chosen = choice["chosen"]
    lines = [
        "## Pipeline choice (auto, label-free)",
        "",
        f"Chose {chosen['pruner']} / {chosen['allocation']} / {chosen['repair']} (pruner / allocation / repair): the lowest "
        f"ranking value after a {choice['probe_epochs']}-epoch heal of each candidate ({choice['search']}); ranking value = "
        f"{choice.get('rank_by', 'kl')} ({choice.get('rank_reason', '')}); held-out data: {choice['holdout']}; probing took {choice['seconds']:.1f} s.",
        "",
        "| pruner | allocation | repair | held-out objective before | after the short heal | held-out KL(dense ‖ sparse) after | probe time |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.5g}"

    for c in choice["candidates"]:
        mark = " **(chosen)**" if all(c[k] == chosen[k] for k in chosen) else ""
        lines.append(
            f"| {c['pruner']}{mark} | {c['allocation']} | {c['repair']} | {num(c['start'])} | {num(c['objective'])} | {num(c.get('kl'))} | {c['seconds']:.1f} s |"
        )
    return lines + [""]


def _plot_lines(report: dict) -> list[str]:
    """Markdown image links for the PNGs written beside the report (none when there are none)."""
    lines: list[str] = []
    for name in report.get("plots") or []:
        lines += [f"![{_PLOT_TITLES.get(name, name)}]({name})", ""]
    return lines


def _budget_text(heal: dict) -> str:
    if heal.get("budget") == "auto":
        return (f"budget auto (cosine over at most {heal.get('max_epochs')} epochs, held-out check every "
                f"{heal.get('eval_every')} epochs, patience {heal.get('patience')}, min delta {heal.get('min_delta')})")
    return f"epochs {heal.get('epochs')} (fixed budget)"


def _protocol_extras(report: dict) -> list[str]:
    """The rest of what reproducing the run needs: preprocessing, blocks, the full heal budget."""
    heal = report.get("heal", {})
    pre = report.get("preprocess") or {}
    lines = []
    if pre and "perplexity" not in report:  # image preprocessing means nothing for a language model
        lines.append(
            f"- Preprocessing: {pre.get('input_size')}px, resize {pre.get('resize')}, {pre.get('interpolation')}, "
            f"mean {pre.get('mean')}, std {pre.get('std')}, {pre.get('channels', 3)} channel(s)"
            + (f" — **assumed** ({pre['assumed']})" if pre.get("assumed") else "")
        )
    for key, note in (report.get("model_notes") or {}).items():
        lines.append(f"- Model note ({key.replace('_', ' ')}): {note}")
    if report.get("healer") != "none":
        lines.append(
            f"- Heal details: {heal.get('steps')} optimizer steps (max steps {heal.get('max_steps')}), weight decay "
            f"{heal.get('weight_decay')}, train mode {heal.get('train_mode')}, BatchNorm {heal.get('bn_mode', 'frozen')}, temperature {heal.get('temperature')}, "
            f"seed {report['calibration']['seed']}, device {heal.get('device')}; calibration drawn uniformly at random "
            "without replacement (seeded)"
        )
    align = report.get("alignment")
    if align:
        lines.append(f"- Block alignment measured on {align['images']}")
    return lines


def _pct2(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def language_lines(report: dict) -> list[str]:
    """Perplexity on every --eval text and zero-shot accuracy per task, one column per scored model."""
    lines: list[str] = []
    texts = report.get("perplexity_by_text")
    if texts:
        labels = list(next(iter(texts.values()))["perplexity"])
        lines += ["## Perplexity per text", "", "| text | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
        for name, entry in texts.items():
            values = entry["perplexity"]
            lines.append(f"| {name} (`{entry['sha256'][:12]}`, {entry['windows']} x {entry['seq_len']} tokens) | "
                         + " | ".join("—" if values.get(k) is None else f"{values[k]:.2f}" for k in labels) + " |")
        lines.append("")
    zs = report.get("zeroshot")
    if zs:
        from starfish.zeroshot.catalog import ZEROSHOT_TASKS

        labels = list(zs["scores"])
        lines += ["## Zero-shot tasks (lm-evaluation-harness)", "", "| task (metric) | items | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
        for name in zs["tasks"]:
            metric = ZEROSHOT_TASKS.get(name).headline
            items = zs["protocol"]["tasks"][name]["items"]
            lines.append(f"| {name} ({metric}) | {items} | " + " | ".join(_pct2(zs["scores"][k]["tasks"][name].get(metric)) for k in labels) + " |")
        lines.append("| **mean** | | " + " | ".join(_pct2(zs["scores"][k]["mean"]) for k in labels) + " |")
        p = zs["protocol"]
        items = "all items" if p["limit"] is None else f"a seeded subset of {p['limit']} items per task"
        lines += ["", f"lm-evaluation-harness {p['lm_eval_version']}, zero-shot, {items} (seed {p['seed']}); task files and their sha256 in report.json (`zeroshot.protocol`).", ""]
    return lines


def _reason(heal: dict) -> str:
    """Why the target cache has its dtype, where starfish chose it."""
    return f" ({heal['cache_dtype_reason']})" if heal.get("cache_dtype_reason") else ""
