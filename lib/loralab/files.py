"""Writing result files so that none is ever half-written: a file holds its old content or all of the new."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``: written to ``path.tmp``, then renamed; the tmp
    file is removed when the write fails (a full disk leaves no half-written file behind)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str))
