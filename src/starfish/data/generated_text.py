"""Calibration text written by the dense model itself (``--calib-generate N``).

Why: a few dozen sequences of one corpus are what a heal fits; text sampled from the dense model
is unlabeled, unlimited and follows the distribution the healed model should keep, not one corpus's
(Shin et al., EMNLP 2024, report it reduces overfitting of block reconstruction). Sequences are
sampled at temperature 1 with no truncation (the model's own distribution), every one started from
the tokenizer's beginning-of-text token and run to the full length (end-of-text suppressed), in
batches under one seed, so the same seed and model give the same tokens. They join the heal's
calibration only: pruning and the held-out stopping text still read the ``--calib`` text, so the
pruned model is the same with and without them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from starfish.nn.batch import ATTENTION, TOKENS, Batch, batch_digest
from starfish.errors import StarfishError

GENERATE_BATCH = 16  # sequences sampled at once: bounds the key/value cache (SmolLM2-135M, 512 tokens: ~0.4 GB)
FILE_NAME = "calibration_generated.jsonl"  # one {"text": ...} per line: readable again as --calib


def start_token(tokenizer) -> int:
    """The token every generated sequence starts from: beginning-of-text, else end-of-text."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    raise StarfishError("--calib-generate needs a tokenizer with a beginning- or end-of-text token; drop --calib-generate for this model.")


@torch.no_grad()
def generate_calibration(model: nn.Module, tokenizer, count: int, seq_len: int, seed: int, device: str | torch.device = "cpu",
                         temperature: float = 1.0) -> Batch:
    """``count`` sequences of ``seq_len`` tokens sampled from ``model``, reproducible from ``seed``."""
    if count < 1 or seq_len < 2:
        raise StarfishError(f"--calib-generate needs at least 1 sequence of at least 2 tokens; got {count} x {seq_len}.")
    first = start_token(tokenizer)
    was_training, home = model.training, next(model.parameters()).device
    model.eval().to(device)
    rows = []
    try:
        with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, count, GENERATE_BATCH):
                size = min(GENERATE_BATCH, count - start)
                prompt = torch.full((size, 1), first, dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                    max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=first,
                )
                rows.append(out[:, :seq_len].cpu())
    finally:
        model.to(home).train(was_training)
    ids = torch.cat(rows)
    return {TOKENS: ids, ATTENTION: torch.ones_like(ids)}


def protocol(batch: Batch, seed: int, temperature: float = 1.0) -> dict:
    """What the report says about the generated calibration: enough to make it again and check it."""
    count, seq_len = batch[TOKENS].shape
    return {"count": int(count), "seq_len": int(seq_len), "seed": seed, "temperature": temperature, "top_k": None,
            "start": "beginning-of-text token", "token_ids_sha256": batch_digest({TOKENS: batch[TOKENS]}), "file": FILE_NAME}


def write_texts(batch: Batch, tokenizer, folder: Path) -> Path:
    """The generated sequences as JSON lines of decoded text, so a later run can read them as ``--calib``."""
    path = folder / FILE_NAME
    with path.open("w", encoding="utf-8") as f:
        for row in batch[TOKENS]:
            f.write(json.dumps({"text": tokenizer.decode(row.tolist(), skip_special_tokens=True)}) + "\n")
    return path


def joined(calibration: Batch | None, generated: Batch | None) -> Batch | None:
    """The heal's calibration: the text's sequences followed by the generated ones (same length)."""
    if generated is None or calibration is None:
        return calibration if generated is None else generated
    if calibration[TOKENS].shape[1] != generated[TOKENS].shape[1]:
        raise StarfishError("generated and text calibration sequences differ in length; pass the same --seq-len for both.")
    return {k: torch.cat([calibration[k], generated[k]]) for k in (TOKENS, ATTENTION)}
