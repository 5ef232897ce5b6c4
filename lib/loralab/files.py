"""Writing result files so that none is ever half-written: a file holds its old content or all of the new."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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


def rewrite_in_place(path: Path, text: str) -> None:
    """Overwrite an existing file's content without making a new file beside it: for a file that is still
    writable in a folder that is not (no tmp file can be made there). Not atomic: the atomic writers are the rule."""
    with open(path, "r+", encoding="utf-8") as f:
        f.write(text)
        f.truncate()


@contextlib.contextmanager
def atomic_folder(final: Path, replace_empty: bool = True, keep_existing: bool = False):
    """Build a folder in a hidden temporary sibling and rename it to ``final`` when the block ends: ``final``
    holds all of it or does not exist (a failure, a kill, a full disk leave no half folder; the temporary one
    is removed on failure). Yields the temporary folder to write into.

    ``replace_empty``: an empty ``final`` is replaced (a non-empty one is never: the rename fails).
    ``keep_existing``: when ``final`` appeared meanwhile (another process finished first), keep it and drop ours."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if replace_empty and final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        try:
            os.replace(tmp, final)
        except OSError:
            if not (keep_existing and final.exists()):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
