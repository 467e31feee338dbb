"""Reload a `starfish run` language-model output with plain transformers and check what it claims.

Loads ``OUT/model`` with ``AutoModelForCausalLM.from_pretrained`` (no starfish code touches the
model), recomputes the healed perplexity on the evaluation windows that ``OUT/report.json`` names
(the same token windows starfish scored: its tokenizer pass over the text), with a hand-written
next-token cross-entropy, and checks that every weight named in ``OUT/masks.safetensors`` is exactly
zero where its mask is zero. Prints one JSON line; exit 1 if either check fails.

    python benchmarks/lm_reload_check.py OUT
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def masked_nonzeros(model_dir: Path, masks_path: Path) -> tuple[int, int]:
    """(pruned entries that are not zero, pruned entries) over every masked weight in the folder."""
    from safetensors.torch import load_file

    masks = load_file(str(masks_path))
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(shard)))
    bad = sum(int(torch.count_nonzero(weights[name][~keep])) for name, keep in masks.items())
    return bad, sum(int((~keep).sum()) for keep in masks.values())


@torch.no_grad()
def plain_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over every predicted token of the windows, one window at a time."""
    total, count = 0.0, 0
    for window in windows:
        ids = window.unsqueeze(0)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, count = total + float(nll), count + ids.shape[1] - 1
    return math.exp(total / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a `starfish run --out` folder of a language model")
    parser.add_argument("--rel-tol", type=float, default=1e-3, help="allowed relative perplexity difference")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from starfish.data.text import evaluation_windows

    report = json.loads((args.out / "report.json").read_text())
    ev = report["eval"]
    model = AutoModelForCausalLM.from_pretrained(args.out / "model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.out / "model")
    text = ev.get("text") or ev["source"]  # with several --eval texts, "perplexity" is the first one's
    windows = evaluation_windows(text, tokenizer, ev["seq_len"], ev["windows"])
    if windows.sha256 != ev["text_sha256"]:
        sys.exit(f"{text} changed since the run (sha256 differs)")
    again = plain_perplexity(model, windows.input_ids)
    claimed = report["perplexity"]["healed"]
    bad, pruned = masked_nonzeros(args.out / "model", args.out / "masks.safetensors")
    ok = abs(again - claimed) <= args.rel_tol * claimed and bad == 0
    print(json.dumps({"out": str(args.out), "reported_healed": claimed, "reloaded": again, "pruned_entries": pruned,
                      "pruned_entries_not_zero": bad, "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
