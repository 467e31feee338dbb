"""Text for causal language models: calibration sequences and evaluation windows.

Sources are a ``.txt`` file (one document: the whole file), a ``.jsonl`` file (one document per
line, field ``"text"``) or a folder of them (sorted by name, not recursive), in UTF-8 (or UTF-16
with a byte-order mark).

* Calibration (``calibration_text``): ``size`` sequences of ``seq_len`` tokens drawn with a seed.
  A document is picked with probability proportional to its token count (so every token is about
  equally likely to be seen), then a window inside it uniformly; a document shorter than
  ``seq_len`` is taken whole and right-padded, with ``attention_mask`` 0 on the padding so it never
  counts. The result is one Batch mapping ``{"input_ids", "attention_mask"}``.
* Evaluation (``evaluation_windows``): the literature's perplexity protocol. The whole text is
  tokenized once and cut into non-overlapping windows of ``seq_len`` tokens (the remainder that does
  not fill a window is dropped); ``size`` keeps the first windows. Windows are streamed as batches.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from starfish.nn.batch import ATTENTION, TOKENS, Batch
from starfish.errors import StarfishError

TEXT_SUFFIXES = (".txt", ".jsonl")
DOCUMENT_SEPARATOR = "\n\n"  # joins documents when a source is evaluated as one text
TEXT_CALIB_DEFAULT = 240  # calibration sequences when --calib-size is not given: more than the Wanda/SparseGPT 128; the default heal's 480 steps of 2 (starfish.experiments.defaults) see each sequence 4 times


def text_files(path: str | Path) -> list[Path]:
    """The text files of a source: the file itself, or a folder's .txt/.jsonl files by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise StarfishError(f"folder {path} holds no .txt or .jsonl files; point at a text file or a folder of them.")
        return files
    if not path.is_file():
        raise StarfishError(f"text source {path} does not exist; pass a .txt or .jsonl file or a folder of them.")
    if path.suffix not in TEXT_SUFFIXES:
        raise StarfishError(f"text source {path} is not .txt or .jsonl; convert it or rename it.")
    return [path]


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a UTF-8 or UTF-16 byte-order mark decides the encoding); anything else is
    refused naming the first byte that is not UTF-8, instead of a decoding traceback."""
    data = path.read_bytes()
    codec = "utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as exc:
        raise StarfishError(
            f"{path} is not {'UTF-16' if codec == 'utf-16' else 'UTF-8'} text (byte offset {exc.start}: 0x{data[exc.start]:02x}); "
            "convert it to UTF-8 (e.g. iconv -t UTF-8) or point at a text file."
        ) from None


def _jsonl_documents(path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StarfishError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one JSON object.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise StarfishError(f'{path}:{number} has no string field "text"; each line must look like {{"text": "..."}}.')
        docs.append(record["text"])
    return docs


def read_documents(path: str | Path) -> list[str]:
    """Every non-empty document of a source, in file order."""
    docs: list[str] = []
    for file in text_files(path):
        if file.suffix == ".jsonl":
            docs += _jsonl_documents(file)
        else:
            docs.append(read_text(file))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise StarfishError(f"text source {path} is empty; it needs some text.")
    return docs


def source_sha256(path: str | Path) -> str:
    """sha256 of the file, or of the concatenated files of a folder (in name order)."""
    h = hashlib.sha256()
    for file in text_files(path):
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of one text as a 1-D tensor (the tokenizer's own special tokens included, as the
    published protocol's ``tokenizer(text)`` does)."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _check_lengths(seq_len: int, size: int | None) -> None:
    if seq_len < 2:
        raise StarfishError(f"sequence length must be at least 2 tokens (one is predicted from another); got {seq_len}.")
    if size is not None and size < 1:
        raise StarfishError(f"the number of sequences must be at least 1; got {size}.")


# Where drawn sequences sit in their source: (document index, first token, tokens taken).
Picks = list[tuple[int, int, int]]
HELD_OUT_TRIES = 200  # candidate windows drawn per held-out sequence before the text counts as too short


def calibration_text(path: str | Path, tokenizer, size: int, seq_len: int, seed: int = 0) -> Batch:
    """``size`` sequences of ``seq_len`` tokens from a text source as one Batch mapping."""
    return draw_sequences(read_documents(path), tokenizer, size, seq_len, seed, name=f"text source {path}")[0]


def calibration_sequences(documents: list[str], tokenizer, size: int, seq_len: int, seed: int = 0, name: str = "the calibration text") -> Batch:
    """``size`` sequences of ``seq_len`` tokens drawn from ``documents`` (in memory), see ``draw_sequences``."""
    return draw_sequences(documents, tokenizer, size, seq_len, seed, name)[0]


def draw_sequences(
    documents: list[str], tokenizer, size: int, seq_len: int, seed: int = 0, name: str = "the calibration text", avoid: Picks | None = None,
) -> tuple[Batch, Picks]:
    """``size`` sequences of ``seq_len`` tokens drawn from ``documents``, and where they were taken.

    A document is picked in proportion to its length, then a window inside it, both from ``seed``;
    a document shorter than ``seq_len`` is padded (attention mask 0). With ``avoid`` (the picks of
    another draw from the same documents, e.g. the calibration sequences) no window shares a token
    position with those: a held-out check on sequences that overlap the training ones measures
    partly what was trained on (drawn independently, 48% of the 32-token chunks of SmolLM2's 16
    default held-out sequences of WikiText-2 validation sat in 256 calibration sequences:
    ``benchmarks/holdout_overlap.py``). A text too short
    to hold ``size`` windows apart gets the rest drawn without the rule (``overlapping`` counts them)."""
    _check_lengths(seq_len, size)
    docs = [tokenize(tokenizer, d) for d in documents]
    docs = [d for d in docs if d.numel() > 0]
    if not docs:
        raise StarfishError(f"{name} yields no tokens with this tokenizer.")
    lengths = torch.tensor([d.numel() for d in docs], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((size, seq_len), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((size, seq_len), dtype=torch.long)

    def window(doc_index: int) -> tuple[int, int, int]:
        """A seeded window of document ``doc_index``: (document, first token, tokens taken)."""
        start = int(torch.randint(0, max(docs[doc_index].numel() - seq_len, 0) + 1, (1,), generator=generator))
        return doc_index, start, min(seq_len, docs[doc_index].numel() - start)

    if avoid is None:
        picks = [window(d) for d in torch.multinomial(lengths, size, replacement=True, generator=generator).tolist()]
    else:
        picks, taken = [], list(avoid)
        for _ in range(size * HELD_OUT_TRIES):
            if len(picks) == size:
                break
            pick = window(int(torch.multinomial(lengths, 1, generator=generator)))
            if not overlapping([pick], taken):
                picks.append(pick)
                taken.append(pick)
        while len(picks) < size:  # a text too short to hold them apart: the rest may overlap (``overlapping`` counts them)
            picks.append(window(int(torch.multinomial(lengths, 1, generator=generator))))
    for row, (doc_index, start, count) in enumerate(picks):
        ids[row, :count] = docs[doc_index][start : start + count]
        mask[row, :count] = 1
    return {TOKENS: ids, ATTENTION: mask}, picks


def overlapping(picks: Picks, avoid: Picks) -> int:
    """How many of ``picks`` share a token position with any of ``avoid``."""
    return sum(any(d == doc and start < s + c and s < start + count for d, s, c in avoid) for doc, start, count in picks)


@dataclass
class TextWindows:
    """Non-overlapping evaluation windows of one tokenized text, plus how they were made."""

    input_ids: torch.Tensor  # (windows, seq_len)
    source: str
    sha256: str
    total_tokens: int  # tokens of the whole text (windows cover the first windows * seq_len)

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int = 1) -> Iterator[Batch]:
        """Windows as text batches (every position real: attention_mask all ones)."""
        for i in range(0, len(self), batch_size):
            ids = self.input_ids[i : i + batch_size]
            yield {TOKENS: ids, ATTENTION: torch.ones_like(ids)}

    def __iter__(self) -> Iterator[Batch]:
        return self.batches(1)

    def protocol(self) -> dict:
        """What a report records so the number can be reproduced."""
        return {
            "text": self.source,
            "sha256": self.sha256,
            "windows": len(self),
            "seq_len": self.seq_len,
            "tokens": len(self) * self.seq_len,
            "predicted_tokens": len(self) * (self.seq_len - 1),
            "text_tokens": self.total_tokens,
        }


def evaluation_windows(path: str | Path, tokenizer, seq_len: int, size: int | None = None) -> TextWindows:
    """The first ``size`` (default: all) non-overlapping ``seq_len``-token windows of the text."""
    _check_lengths(seq_len, size)
    ids = tokenize(tokenizer, DOCUMENT_SEPARATOR.join(read_documents(path)))
    available = ids.numel() // seq_len
    if available == 0:
        raise StarfishError(f"{path} has {ids.numel()} tokens, fewer than one window of {seq_len}; lower --eval-seq-len.")
    count = available if size is None else size
    if count > available:
        raise StarfishError(f"{path} has only {available} windows of {seq_len} tokens; lower --eval-size to at most {available}.")
    windows = ids[: count * seq_len].view(count, seq_len).clone()
    return TextWindows(windows, str(path), source_sha256(path), int(ids.numel()))


def text_name(path: str, taken: set[str]) -> str:
    """A report name for a perplexity text: its file stem, with its folder where stems repeat."""
    p = Path(path)
    name = p.stem if p.stem not in taken else f"{p.parent.name}/{p.stem}"
    if name in taken:
        raise StarfishError(f"--eval names {path} twice; name each text once.")
    taken.add(name)
    return name
