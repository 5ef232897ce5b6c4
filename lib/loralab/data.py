"""Dialogue-summary data: sources, the study's prompt, llama-recipes packing, batches.

Sources (``load_splits``):
- ``"builtin"``: loralab's own templated set (``loralab.builtin_data``);
- a folder with SAMSum's ``train.json``, ``val.json``, ``test.json`` (or ``.jsonl``/``.csv``);
- one JSON / JSONL / CSV file with ``dialogue`` and ``summary`` columns (and an optional
  ``split`` column; without one, a fixed 90/5/5 split by row order).

Prompt and packing follow llama-recipes (2023) ``samsum_dataset.py`` and its
``Concatenator``: each example is ``BOS + "Summarize this dialog:\\n{dialog}\\n---\\n
Summary:\\n{summary}" + EOS`` (the template's ``{eos_token}`` is the literal
``</s>``, which the Llama tokenizer maps to the EOS id 2); all examples of a split are
concatenated and cut into ``seq_len`` chunks, the tail dropped; labels = input_ids
(loss on every token). The DataLoader is sequential with ``drop_last=True``, so
steps per epoch = chunks // batch size (1555 // 4 = 388).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from loralab.config import ConfigError
from loralab.tokenizer import TextTokenizer

PROMPT_TEMPLATE = "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation", "dev"), "test": ("test",)}


def _rows_from_file(path: Path) -> list[dict]:
    name = str(path)
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...], ...}
                data = data.get("data", data)
            rows = data
        elif path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        else:
            raise ConfigError(f"data {name!r}: expected a .json, .jsonl or .csv file")
    except json.JSONDecodeError as e:
        raise ConfigError(f"data {name!r}: malformed JSON ({e.msg} at line {e.lineno}); expected a JSON list of objects or JSON lines") from None
    if isinstance(rows, dict):
        return rows  # split dict, handled by caller
    if not isinstance(rows, list) or (rows and not isinstance(rows[0], dict)):
        raise ConfigError(f"data {name!r}: expected a list of objects with 'dialogue' and 'summary'")
    return rows


def _check_columns(rows: list[dict], name: str) -> list[dict[str, str]]:
    if not rows:
        raise ConfigError(f"data {name!r}: no rows; expected objects with 'dialogue' and 'summary'")
    out = []
    for i, r in enumerate(rows):
        missing = [c for c in ("dialogue", "summary") if c not in r]
        if missing:
            raise ConfigError(f"data {name!r}: row {i} lacks column(s) {missing}; expected 'dialogue' and 'summary' (found {sorted(r)})")
        # An empty dialogue is kept (SAMSum train has one), as llama-recipes did.
        out.append({"dialogue": r["dialogue"] or "", "summary": r["summary"] or ""})
    return out


def load_splits(source: str | Path) -> dict[str, list[dict[str, str]]]:
    """{"train", "val", "test"} -> list of {"dialogue", "summary"}."""
    if str(source) == "builtin":
        from loralab.builtin_data import make_builtin_dataset
        return make_builtin_dataset()
    p = Path(source).expanduser()
    if not p.exists():
        raise ConfigError(f"data {str(source)!r}: no such file or folder; expected 'builtin', a SAMSum folder (train.json, val.json, test.json) or a .json/.jsonl/.csv file")
    if p.is_dir():
        files = {}
        for split in SPLITS:
            found = [p / f"{alias}{ext}" for alias in _SPLIT_ALIASES[split]
                     for ext in (".json", ".jsonl", ".csv") if (p / f"{alias}{ext}").exists()]
            if not found:
                raise ConfigError(f"data {str(source)!r}: no {split} file; expected {split}.json (or .jsonl/.csv) in the folder")
            files[split] = found[0]
        return {split: _check_columns(_rows_from_file(f), str(f)) for split, f in files.items()}
    rows = _rows_from_file(p)
    if isinstance(rows, dict):
        return {s: _check_columns(rows.get(s, []), f"{p}[{s}]") for s in SPLITS}
    rows = _check_columns_keep_split(rows, str(p))
    if any("split" in r for r in rows):
        return {s: [r for r in rows if r.get("split") in _SPLIT_ALIASES[s]] for s in SPLITS}
    n = len(rows)
    a, b = int(n * 0.9), int(n * 0.95)
    return {"train": rows[:a], "val": rows[a:b], "test": rows[b:]}


def _check_columns_keep_split(rows: list[dict], name: str) -> list[dict]:
    checked = _check_columns(rows, name)
    for r, c in zip(rows, checked):
        if "split" in r:
            c["split"] = r["split"]
    return checked


def format_prompt(example: dict[str, str], with_summary: bool = True) -> str:
    text = PROMPT_TEMPLATE.format(dialog=example["dialogue"])
    return text + example["summary"] if with_summary else text


def prompt_ids(tok: TextTokenizer, example: dict[str, str], with_summary: bool = True) -> list[int]:
    """[BOS] + prompt (+ summary + [EOS]): the study's training example as ids."""
    ids = [tok.bos_id] + tok.encode(format_prompt(example, with_summary))
    return ids + [tok.eos_id] if with_summary else ids


def pack(sequences: list[list[int]], seq_len: int) -> list[list[int]]:
    """llama-recipes Concatenator: concatenate, cut into seq_len chunks, drop the tail."""
    flat = [t for s in sequences for t in s]
    n = len(flat) // seq_len
    return [flat[i * seq_len:(i + 1) * seq_len] for i in range(n)]


@dataclass
class TokenizedSplit:
    """One split, tokenized: packed chunks (or single padded examples) and counts."""

    rows: list[list[int]]
    n_examples: int
    n_tokens: int
    """Tokens of all examples before packing (the packed chunks hold n_tokens minus the tail)."""
    lengths: list[int]
    packed: bool
    seq_len: int

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self.rows) // batch_size  # drop_last=True, as llama-recipes


def tokenize_split(tok: TextTokenizer, examples: list[dict[str, str]], seq_len: int,
                   packing: bool = True) -> TokenizedSplit:
    seqs = [prompt_ids(tok, ex) for ex in examples]
    lengths = [len(s) for s in seqs]
    rows = pack(seqs, seq_len) if packing else [s[:seq_len] for s in seqs]
    return TokenizedSplit(rows=rows, n_examples=len(seqs), n_tokens=sum(lengths),
                          lengths=lengths, packed=packing, seq_len=seq_len)


def tokenize_splits(tok: TextTokenizer, splits: dict[str, list[dict[str, str]]], seq_len: int,
                    packing: bool = True) -> dict[str, TokenizedSplit]:
    return {name: tokenize_split(tok, ex, seq_len, packing) for name, ex in splits.items()}


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
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": mask, "labels": labels}
