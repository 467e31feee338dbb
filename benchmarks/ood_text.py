"""An out-of-domain text every machine has: Python standard-library source files, concatenated.

Healing calibrates on WikiText; perplexity on a text of another domain shows whether it bought
WikiText perplexity with worse perplexity elsewhere. The text is the modules below (sorted by
name) from the running interpreter's standard library, joined with blank lines; the file list,
each file's sha256 and the text's sha256 are written beside it, so a number can be traced to the
exact bytes (they differ between Python versions: compare numbers made with the same text).

    python benchmarks/ood_text.py --out runs/ood/python_stdlib.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

# Plain, long-lived pure-Python modules (about 600 kB together on CPython 3.11).
MODULES = (
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py", "csv.py", "dataclasses.py",
    "difflib.py", "enum.py", "fractions.py", "functools.py", "inspect.py", "pathlib.py", "pickle.py", "shutil.py",
    "statistics.py", "string.py", "tarfile.py", "textwrap.py", "typing.py", "zipfile.py",
)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ensure(out: Path) -> dict:
    """The text's record, building the text at ``out`` first where it is not there yet."""
    return build(out) if not out.is_file() else json.loads(out.with_suffix(".json").read_text())


def build(out: Path) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / m for m in sorted(MODULES) if (root / m).is_file()]
    if not files:
        raise SystemExit(f"no standard-library sources under {root}")
    texts = [f.read_text(encoding="utf-8") for f in files]
    text = "\n\n".join(texts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    record = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "files": {str(f.relative_to(root)): sha256_bytes(f.read_bytes()) for f in files},
        "bytes": len(text.encode("utf-8")),
        "sha256": sha256_bytes(out.read_bytes()),
        "joined_with": "\\n\\n",
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ood/python_stdlib.txt"))
    record = build(parser.parse_args().out)
    print(f"{len(record['files'])} files, {record['bytes']} bytes, sha256 {record['sha256']}")


if __name__ == "__main__":
    main()
