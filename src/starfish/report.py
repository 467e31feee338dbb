"""Human-readable reports: the numbers side by side, and the protocol needed to reproduce them."""

from __future__ import annotations


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def render_markdown(report: dict) -> str:
    top1 = report["top1"]
    fid = report.get("fidelity_to_dense", {})
    lines = [
        f"# starfish report — {report['model']} at {pct(report['sparsity'])} sparsity",
        "",
        "| model | top-1 | of dense | agreement with dense | KL(dense ‖ model) |",
        "|---|---|---|---|---|",
    ]
    dense = top1.get("dense")
    for label in ("dense", "pruned", "healed"):
        acc = top1.get(label)
        share = pct(acc / dense) if acc is not None and dense else "—"
        f = fid.get(label, {})
        agree = pct(f.get("agreement")) if f else "—"
        kl = f"{f['kl']:.4f}" if f else "—"
        name = label if label != "healed" else f"healed ({report['healer']})"
        lines.append(f"| {name} | {pct(acc)} | {share} | {agree} | {kl} |")
    heal = report.get("heal", {})
    lines += [
        "",
        f"Recovered fraction (healed / dense top-1): **{pct(report.get('recovered_fraction'))}**. "
        f"Healing took {report['heal_seconds']:.1f} s"
        + (f" ({heal.get('steps')} steps); peak memory {report['peak_memory_mb']:.0f} MB ({report['memory_measure']})." if report.get("peak_memory_mb") else "."),
        "",
        "## Protocol",
        "",
        f"- Model: `{report['model']}`, weights `{report['weights']}` (sha256 `{report.get('weights_sha256')}`)",
        f"- Pruning: {report['pruner']}, allocation {report['allocation']}, requested sparsity "
        f"{report['requested_sparsity']}, achieved {report['sparsity']:.6f} over {report['prunable_weights']} prunable weights",
        f"- Calibration: {report['calibration']['size']} images from `{report['calibration']['source']}`, "
        f"seed {report['calibration']['seed']} (labels not used{' — except by this healer' if report.get('uses_labels') else ''})",
        f"- Evaluation: {report['eval']['size']} images from `{report['eval']['source']}` (class-balanced, seed {report['eval']['seed']})",
        f"- Healer `{report['healer']}`: optimizer {heal.get('optimizer')}, lr {heal.get('lr')} → {heal.get('min_lr')} (cosine per step), "
        f"batch {heal.get('batch_size')}, epochs {heal.get('epochs')}, cache {heal.get('cache_dtype')}, blocks {len(heal.get('blocks') or [])}",
        f"- Software: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
    ]
    if report.get("command"):
        lines += ["", "Command:", "", "```", report["command"], "```"]
    lines += ["", "## Per-layer sparsity", "", "| weight | sparsity |", "|---|---|"]
    lines += [f"| `{k}` | {pct(v)} |" for k, v in report["layer_sparsity"].items()]
    return "\n".join(lines) + "\n"
