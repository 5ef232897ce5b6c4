"""Shared test setup: an isolated LORALAB_HOME per session, and paths to the real shared data.

The real SAMSum files and Meta's Llama 2 tokenizer are never copied into the project;
tests read them from LORALAB_SAMSUM_DIR and LORALAB_LLAMA2_TOKENIZER (set by .ci/run)
and skip, saying why, when those are unset.
"""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def loralab_home(tmp_path_factory):
    """Presets are built into a fresh folder once per test session, never into the user's cache."""
    home = tmp_path_factory.mktemp("loralab_home")
    old = os.environ.get("LORALAB_HOME")
    os.environ["LORALAB_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LORALAB_HOME", None)
    else:
        os.environ["LORALAB_HOME"] = old


@pytest.fixture(scope="session")
def samsum_dir() -> Path:
    p = os.environ.get("LORALAB_SAMSUM_DIR")
    if not p or not Path(p).is_dir():
        pytest.skip("LORALAB_SAMSUM_DIR not set (folder with SAMSum train/val/test.json; .ci/run sets it)")
    return Path(p)


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    """Meta's tokenizer.model: LORALAB_LLAMA2_TOKENIZER names the file or the folder holding it (as --tokenizer)."""
    p = Path(os.environ.get("LORALAB_LLAMA2_TOKENIZER", "")).expanduser()
    if p.is_dir():
        p = p / "tokenizer.model"
    if not p.is_file() or p.suffix != ".model":
        pytest.skip("LORALAB_LLAMA2_TOKENIZER not set (Meta's Llama 2 tokenizer.model or its folder; .ci/run sets it)")
    return p
