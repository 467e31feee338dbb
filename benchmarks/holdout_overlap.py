"""How much of the language-model held-out text sits inside the calibration sequences (issue 22).

The held-out stopping check should read text healing never trained on. Both draws come from the
same ``--calib`` text; this counts, for the default 256 calibration and 16 held-out sequences of 512
tokens of WikiText-2 validation (SmolLM2-135M's tokenizer, seed 0), the share of held-out
32-token chunks that also occur in a calibration sequence: drawn independently (before) and drawn
apart from the calibration windows (``data.text.draw_sequences(avoid=...)``, now).

    python benchmarks/holdout_overlap.py
"""

from __future__ import annotations

import sys

from lm_heal import MODEL, REPO, SHARED
from starfish.data.holdout import SEED_OFFSET, TEXT_DEFAULT
from starfish.data.text import TEXT_CALIB_DEFAULT, draw_sequences, read_documents

CHUNK = 32
SEQ_LEN = 512
TABLE = REPO / "benchmarks" / "HOLDOUT_OVERLAP.md"


def chunks(ids, mask) -> list[tuple[int, ...]]:
    out = []
    for row, keep in zip(ids.tolist(), mask.tolist()):
        real = [t for t, k in zip(row, keep) if k]
        out += [tuple(real[i : i + CHUNK]) for i in range(0, len(real) - CHUNK + 1, CHUNK)]
    return out


def main() -> int:
    from transformers import AutoTokenizer

    if not (MODEL / "config.json").is_file():
        sys.exit(f"no SmolLM2 folder at {MODEL}: run python scripts/install_smollm2.py first")
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    source = SHARED / "data/wikitext2/valid.tokenized.txt"
    documents = read_documents(source)
    calib, picks = draw_sequences(documents, tokenizer, TEXT_CALIB_DEFAULT, SEQ_LEN, 0)
    seen = {tuple(row[i : i + CHUNK]) for row in calib["input_ids"].tolist() for i in range(0, SEQ_LEN - CHUNK + 1)}
    rows = []
    for label, avoid in (("independent draw (before)", None), ("apart from the calibration windows (now)", picks)):
        held, _ = draw_sequences(documents, tokenizer, TEXT_DEFAULT, SEQ_LEN, SEED_OFFSET, avoid=avoid)
        pieces = chunks(held["input_ids"], held["attention_mask"])
        inside = sum(p in seen for p in pieces)
        rows.append(f"| {label} | {inside} / {len(pieces)} = {100 * inside / len(pieces):.1f}% |")
    text = "\n".join([
        "# Held-out text inside the calibration sequences (SmolLM2-135M, WikiText-2 validation)",
        "",
        f"`python benchmarks/holdout_overlap.py`: {TEXT_CALIB_DEFAULT} calibration and {TEXT_DEFAULT} held-out sequences of {SEQ_LEN} tokens "
        f"from `{source.name}` (the language-model defaults, seed 0); share of held-out {CHUNK}-token chunks that also occur in a calibration sequence.",
        "",
        "| held-out draw | chunks inside the calibration text |",
        "|---|---|",
        *rows,
        "",
    ])
    TABLE.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
