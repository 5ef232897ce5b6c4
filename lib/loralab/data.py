"""Dialogue-summary data through Hugging Face ``datasets``: sources, the study's prompt, packing, batches.

Sources (``load_splits``), read from local files only (never from a hub):
- ``"builtin"``: loralab's own templated set (``loralab.builtin_data``);
- a folder with train / val (or validation, dev) / test files, each ``.json``, ``.jsonl``,
  ``.csv`` or ``.parquet`` (SAMSum's ``train.json``, ``val.json``, ``test.json``);
- a folder written by ``DatasetDict.save_to_disk`` (splits train, val or validation, test) or
  by ``Dataset.save_to_disk`` (split 90/5/5 by row order);
- one ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file with ``dialogue`` and ``summary``
  columns and an optional ``split`` column (without one, a fixed 90/5/5 split by row order).
JSON is a list of objects or JSON lines; CSV cells are read as text. A missing or null
dialogue or summary reads as ``""`` (SAMSum train has one empty dialogue, kept as
llama-recipes kept it); other columns are dropped. Files go through datasets' own json / csv
/ parquet builders and ``load_from_disk``, cached under ``LORALAB_HOME/datasets``. Every bad
input is a one-line ``ConfigError`` naming the file.

Prompt and packing follow llama-recipes (2023) ``samsum_dataset.py`` and its
``Concatenator``: each example is ``BOS + "Summarize this dialog:\\n{dialog}\\n---\\n
Summary:\\n{summary}" + EOS`` (the template's ``{eos_token}`` is the literal ``</s>``,
which the Llama tokenizer maps to the EOS id 2); all examples of a split are concatenated
and cut into ``seq_len`` chunks, the tail dropped; labels = input_ids (loss on every token).
The DataLoader is sequential with ``drop_last=True``, so steps per epoch = chunks // batch
size (1555 // 4 = 388). ``tokenize_split`` does this as two batched ``Dataset.map`` passes
(prompt ids per example, then the split's chunks), each cached in
``LORALAB_HOME/datasets/tokenized`` under a fingerprint of the data files' bytes (a saved
folder: its own fingerprints), the tokenizer files' bytes, the prompt template, seq_len and
packing, so a second run with the same inputs reads the chunks instead of tokenizing again
(a tokenizer without a file, as in some tests, is not cached).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only, decided before datasets is imported

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

from loralab.config import ConfigError
from loralab.progress import note
from loralab.tokenizer import TextTokenizer

PROMPT_TEMPLATE = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}
_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_EXPECTED = ("expected 'builtin', a folder with train/val/test files or one saved by save_to_disk, "
             "or a .json/.jsonl/.csv/.parquet file")
_SHAPE = {"json": "a JSON list of objects or JSON lines with 'dialogue' and 'summary'",
          "csv": "a CSV file with a header row naming 'dialogue' and 'summary'",
          "parquet": "a Parquet file with 'dialogue' and 'summary' columns"}
_COLUMNS = ("dialogue", "summary")
_CACHE_VERSION = "1"  # bump when tokenizing or packing changes, so no old cache is read


# --- sources -------------------------------------------------------------------------------
def load_splits(source: str | Path) -> dict[str, Dataset]:
    """{"train", "val", "test"} -> a ``datasets.Dataset`` of {"dialogue", "summary"} rows."""
    p = Path(source).expanduser()
    if str(source) != "builtin" and not p.exists():
        raise ConfigError(f"data {str(source)!r}: no such file or folder; {_EXPECTED}")
    with _quiet():
        if str(source) == "builtin":
            from loralab.builtin_data import make_builtin_dataset

            parts = make_builtin_dataset()
            splits, key = {s: Dataset.from_list(rows) for s, rows in parts.items()}, _digest(json.dumps(parts))
        elif p.is_dir() and ((p / "dataset_dict.json").exists() or (p / "state.json").exists()):
            splits, key = _load_saved(p)
        elif p.is_dir():
            splits, key = _load_folder(p)
        else:
            ds, key = _load_file(p)
            splits = _split_rows(ds, str(p))
        # Each split as text columns, fingerprinted by the source's bytes (the tokenizing cache's key).
        return {split: _text_columns(ds, str(source), _digest(key, split)) for split, ds in splits.items()}


def _load_file(path: Path) -> tuple[Dataset, str]:
    """One data file through datasets' builder for its type; (rows, digest of its bytes)."""
    name = str(path)
    kind = _LOADERS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"data {name!r}: unsupported file type {path.suffix or '(none)'!r}; expected .json, .jsonl, .csv or .parquet")
    data = path.read_bytes()
    if kind != "parquet":
        _check_text(data, name)
    kwargs = {"converters": {c: str for c in (*_COLUMNS, "split")}, "keep_default_na": False} if kind == "csv" else {}
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(_cache_dir()), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line naming the file
        why = ((_json_error(data.decode("utf-8")) if kind == "json" else None)
               or ("no rows" if "corresponds to no data" in str(exc) else None)
               or f"could not read it as {kind.upper()} ({_first_line(exc)})")
        raise ConfigError(f"data {name!r}: {why}; expected {_SHAPE[kind]}") from None
    _check_columns(ds, name)
    return ds, _digest(data)


def _check_text(data: bytes, name: str) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"data {name!r}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
                          "expected a UTF-8 file") from None
    if not data.strip():
        raise ConfigError(f"data {name!r}: empty file; expected rows with 'dialogue' and 'summary'")


def _json_error(text: str) -> str | None:
    """Where a JSON document or JSON-lines file first fails to parse (pyarrow gives no line numbers)."""
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})"
        return None
    for i, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                json.loads(line)
        except json.JSONDecodeError as e:
            return f"malformed JSON at line {i}, column {e.colno} ({e.msg})"
    return None


def _load_folder(folder: Path) -> tuple[dict[str, Dataset], str]:
    files = {}
    for split in SPLITS:
        found = [folder / f"{alias}{ext}" for alias in _SPLIT_ALIASES[split] for ext in _LOADERS
                 if (folder / f"{alias}{ext}").exists()]
        if not found:
            names = " or ".join(f"{alias}.json" for alias in _SPLIT_ALIASES[split])
            raise ConfigError(f"data {str(folder)!r}: no {split} file; expected {names} (or .jsonl/.csv/.parquet) in the folder")
        files[split] = found[0]
    loaded = {split: _load_file(f) for split, f in files.items()}
    return {s: ds for s, (ds, _) in loaded.items()}, _digest(*(key for _, key in loaded.values()))


def _load_saved(folder: Path) -> tuple[dict[str, Dataset], str]:
    """A folder from ``save_to_disk``: a DatasetDict with the three splits, or one Dataset (90/5/5)."""
    name = str(folder)
    try:
        saved = datasets.load_from_disk(name)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"data {name!r}: could not load it with load_from_disk ({_first_line(exc)}); "
                          "expected a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    # the saved folder's own fingerprints: state.json files (and dataset_info.json / dataset_dict.json)
    key = _digest(*((str(f.relative_to(folder)), f.read_bytes()) for f in sorted(folder.rglob("*.json"))))
    if isinstance(saved, Dataset):
        _check_columns(saved, name)
        return _split_rows(saved, name), key
    splits = {}
    for split in SPLITS:
        found = [a for a in _SPLIT_ALIASES[split] if a in saved]
        if not found:
            raise ConfigError(f"data {name!r}: saved DatasetDict has no {split} split (found {sorted(saved)}); "
                              f"expected {' or '.join(_SPLIT_ALIASES[split])}")
        _check_columns(saved[found[0]], f"{name}[{found[0]}]")
        splits[split] = saved[found[0]]
    return splits, key


def _check_columns(ds: Dataset, name: str) -> None:
    missing = [c for c in _COLUMNS if c not in ds.column_names]
    if missing:
        raise ConfigError(f"data {name!r}: lacks column(s) {missing}; expected 'dialogue' and 'summary' "
                          f"(found {sorted(ds.column_names)})")
    if len(ds) == 0:
        raise ConfigError(f"data {name!r}: no rows; expected rows with 'dialogue' and 'summary'")


def _split_rows(ds: Dataset, name: str) -> dict[str, Dataset]:
    """One table -> splits: by its ``split`` column, else 90/5/5 by row order."""
    n = len(ds)
    if "split" in ds.column_names:
        values = pc.cast(ds.with_format("arrow")[:]["split"], pa.string())
        splits = {s: ds.select(np.flatnonzero(pc.is_in(values, value_set=pa.array(_SPLIT_ALIASES[s])).to_numpy()),
                               keep_in_memory=True) for s in SPLITS}
        if len(splits["train"]) == 0:
            raise ConfigError(f"data {name!r}: no row has split 'train' (found {sorted(map(str, ds.unique('split')))}); "
                              "expected at least 1 training row")
        return splits
    a, b = int(n * 0.9), int(n * 0.95)
    if a == 0:
        raise ConfigError(f"data {name!r}: {n} row; a 90/5/5 split by row order needs at least 2 rows "
                          "(1 for training), or a 'split' column")
    return {"train": ds.select(range(a)), "val": ds.select(range(a, b)), "test": ds.select(range(b, n))}


def _text_columns(ds: Dataset, name: str, fingerprint: str) -> Dataset:
    """dialogue and summary as text ("" for null), other columns dropped, under ``fingerprint``."""
    def columns(t: pa.Table) -> pa.Table:
        return pa.table({c: pc.fill_null(t[c].cast(pa.large_string()), "") for c in _COLUMNS})

    try:
        out = ds.with_format("arrow").map(columns, batched=True, remove_columns=ds.column_names,
                                          keep_in_memory=True, new_fingerprint=fingerprint)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ConfigError(f"data {name!r}: 'dialogue' and 'summary' must be text; found "
                          f"{ds.features['dialogue']} and {ds.features['summary']}") from None
    return out.with_format(None)


# --- prompt --------------------------------------------------------------------------------
def format_prompt(example: dict[str, str], with_summary: bool = True) -> str:
    text = PROMPT_TEMPLATE.format(dialog=example["dialogue"])
    return text + example["summary"] if with_summary else text


def prompt_ids(tok: TextTokenizer, example: dict[str, str], with_summary: bool = True) -> list[int]:
    """[BOS] + prompt (+ summary + [EOS]): the study's training example as ids."""
    ids = [tok.bos_id] + tok.encode(format_prompt(example, with_summary))
    return ids + [tok.eos_id] if with_summary else ids


def pack(sequences: Sequence[Sequence[int]], seq_len: int) -> list[list[int]]:
    """llama-recipes Concatenator: concatenate, cut into seq_len chunks, drop the tail."""
    flat = [t for s in sequences for t in s]
    n = len(flat) // seq_len
    return [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]


# --- tokenizing and packing ----------------------------------------------------------------
@dataclass
class TokenizedSplit:
    """One split, tokenized: packed chunks (or single examples, cut at seq_len) and counts."""

    rows: Sequence[Sequence[int]]
    """Packed: an (n_chunks, seq_len) int32 array; unpacked: a list of int32 arrays (any row sequence works)."""
    n_examples: int
    n_tokens: int
    """Tokens of all examples before packing (the packed chunks hold n_tokens minus the tail)."""
    lengths: Sequence[int]
    packed: bool
    seq_len: int

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.rows) // batch_size  # drop_last=True, as llama-recipes


def _encode(dialogues: list[str], summaries: list[str], tok: TextTokenizer) -> dict:
    return {"input_ids": [prompt_ids(tok, {"dialogue": d, "summary": s}) for d, s in zip(dialogues, summaries)]}


def _chunk(t: pa.Table, seq_len: int, packing: bool) -> pa.Table:
    if not packing:
        return pa.table({"input_ids": pc.list_slice(t["input_ids"], 0, seq_len)})
    flat = pc.list_flatten(t["input_ids"]).to_numpy()
    n = len(flat) // seq_len
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat[:n * seq_len], seq_len)})


def tokenize_split(tok: TextTokenizer, examples: Dataset | Sequence[dict[str, str]], seq_len: int,
                   packing: bool = True) -> TokenizedSplit:
    """Prompt ids per example, then llama-recipes packing (or each example cut at seq_len); cached on disk."""
    if not isinstance(examples, Dataset):
        examples = Dataset.from_dict({c: [e[c] for e in examples] for c in _COLUMNS})
    tok_key = _tokenizer_digest(tok)
    # load_splits set the examples' fingerprint from the data's bytes
    key = _digest(examples._fingerprint, tok_key, type(tok).__name__, tok.bos_id, tok.eos_id, PROMPT_TEMPLATE,
                  _CACHE_VERSION)
    fresh = tok_key is None or not (_cache_dir() / "tokenized" / f"{key}.arrow").exists()
    t0 = time.perf_counter()
    if fresh and len(examples) > 1000:
        note(f"tokenizing {len(examples):,} dialogues (cached under LORALAB_HOME for the next run) ...")
    with _quiet():
        ids = _map(examples, _encode, key, tok_key is not None, input_columns=list(_COLUMNS),
                   remove_columns=examples.column_names, fn_kwargs={"tok": tok},
                   features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}))
        chunks = _map(ids.with_format("arrow"), _chunk, _digest(key, seq_len, packing), tok_key is not None,
                      batch_size=None, fn_kwargs={"seq_len": seq_len, "packing": packing})
    lengths = pc.list_value_length(_ids_column(ids)).to_numpy(zero_copy_only=False)
    col = _ids_column(chunks)
    rows = (pc.list_flatten(col).to_numpy().reshape(-1, seq_len) if packing
            else list(col.to_numpy(zero_copy_only=False)))
    if fresh and len(examples) > 1000:
        note(f"tokenized and {'packed' if packing else 'cut'} {len(examples):,} dialogues into {len(rows):,} rows "
             f"in {time.perf_counter() - t0:.1f} s")
    return TokenizedSplit(rows=rows, n_examples=len(examples), n_tokens=int(lengths.sum()), lengths=lengths,
                          packed=packing, seq_len=seq_len)


def tokenize_splits(tok: TextTokenizer, splits: dict[str, Dataset | Sequence[dict[str, str]]], seq_len: int,
                    packing: bool = True) -> dict[str, TokenizedSplit]:
    return {name: tokenize_split(tok, ex, seq_len, packing) for name, ex in splits.items()}


def _map(ds: Dataset, fn, fingerprint: str, cache: bool, **kwargs) -> Dataset:
    """``ds.map(fn, batched=True)`` under an explicit fingerprint, cached in LORALAB_HOME when ``cache``."""
    path = _cache_dir() / "tokenized" / f"{fingerprint}.arrow" if cache else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return ds.map(fn, batched=True, new_fingerprint=fingerprint, load_from_cache_file=True,
                  cache_file_name=str(path) if path else None, keep_in_memory=not cache, **kwargs)


def _ids_column(ds: Dataset) -> pa.ChunkedArray:
    return ds.with_format("arrow")[:]["input_ids"]


def _tokenizer_digest(tok: TextTokenizer) -> str | None:
    """Hash of the tokenizer's files (a .model file, or a folder's tokenizer* files); None: no file, no cache."""
    p = Path(getattr(tok, "source", "") or "")
    files = [p] if p.is_file() else sorted(p.glob("tokenizer*")) if p.is_dir() else []
    return _digest(*(f.read_bytes() for f in files)) if files else None


def check_trainable(train: TokenizedSplit | Sequence | dict, batch_size: int, source: str = "",
                    batch: str | None = None) -> None:
    """A one-line ConfigError when the train split cannot fill one step of ``batch_size`` rows.

    ``train``: a TokenizedSplit, the examples, or a dict of splits (its "train" is checked);
    ``batch`` names the step in the message (default "batch size N").
    """
    if isinstance(train, dict):
        train = train["train"]
    tokenized = isinstance(train, TokenizedSplit)
    n = len(train.rows) if tokenized else len(train)
    if n >= batch_size:
        return
    if tokenized and train.packed:
        have, fix = f"{n} training chunks of {train.seq_len} tokens", "a smaller --batch-sizes or --seq-len, or more data"
    else:
        have, fix = f"{n} training rows (one dialogue each)", "a smaller --batch-sizes, or more data"
    raise ConfigError(f"data {source!r}: {have}; {batch or f'batch size {batch_size}'} needs at least {batch_size} (use {fix})")


# --- batches -------------------------------------------------------------------------------
def batches(split: TokenizedSplit, batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Sequential batches with drop_last (llama-recipes' DataLoader without a sampler).

    Packed rows all have seq_len tokens; unpacked rows are right-padded to the
    longest row of the batch, with labels -100 and attention_mask 0 on padding.
    """
    for s in range(split.steps_per_epoch(batch_size)):
        rows = split.rows[s * batch_size:(s + 1) * batch_size]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- helpers -------------------------------------------------------------------------------
def _cache_dir() -> Path:
    from loralab.model import loralab_home  # lazily: loralab.model imports transformers

    return loralab_home() / "datasets"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def _first_line(exc: BaseException) -> str:
    """The innermost cause's message, first line (datasets wraps reader errors in its own)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@contextlib.contextmanager
def _quiet():
    """datasets' progress bars and error logs off: its failures reach the user as one-line ConfigErrors."""
    bars_off, level = datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if not bars_off:
            datasets.utils.enable_progress_bars()
