"""Data: the built-in set, sources, the study's prompt, llama-recipes packing, batches."""

import hashlib
import json

import pytest

from loralab.builtin_data import make_builtin_dataset
from loralab.config import ConfigError
from loralab.data import (PROMPT_TEMPLATE, batches, format_prompt, load_splits, pack, prompt_ids,
                          tokenize_split, tokenize_splits)
from loralab.tokenizer import load_tokenizer


def digest(rows):
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def test_builtin_is_deterministic_and_split():
    a, b = make_builtin_dataset(), make_builtin_dataset()
    assert {k: len(v) for k, v in a.items()} == {"train": 2000, "val": 200, "test": 200}
    assert digest(a["train"]) == digest(b["train"])
    assert digest(a["train"]) != digest(make_builtin_dataset(seed=7)["train"])
    ex = a["train"][0]
    assert set(ex) == {"dialogue", "summary"} and ex["dialogue"] and ex["summary"].endswith(".")


def test_prompt_is_the_studys():
    assert PROMPT_TEMPLATE == "Summarize this dialog:\n{dialog}\n---\nSummary:\n"
    ex = {"dialogue": "A: hi\nB: hello", "summary": "They greet."}
    assert format_prompt(ex) == "Summarize this dialog:\nA: hi\nB: hello\n---\nSummary:\nThey greet."
    assert format_prompt(ex, with_summary=False).endswith("Summary:\n")


def test_pack_concatenates_cuts_and_drops_tail():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    assert pack(seqs, 4) == [[1, 2, 3, 4], [5, 6, 7, 8]]  # 10 tokens -> 2 chunks, tail [9, 10] dropped
    assert pack([[1, 2]], 4) == []


class CharTok:
    bos_id, eos_id, pad_id, vocab_size, source = 1, 2, 0, 300, "chars"

    def encode(self, text):
        return [3 + ord(c) % 290 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def test_prompt_ids_bos_and_eos():
    ex = {"dialogue": "x", "summary": "y"}
    ids = prompt_ids(CharTok(), ex)
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == len(format_prompt(ex)) + 2
    assert prompt_ids(CharTok(), ex, with_summary=False)[-1] != 2


def test_steps_per_epoch_and_batches_drop_last():
    ts = tokenize_split(CharTok(), make_builtin_dataset()["train"][:100], seq_len=64)
    n = len(ts.rows)
    assert ts.steps_per_epoch(7) == n // 7
    got = list(batches(ts, 7, pad_id=0))
    assert len(got) == n // 7
    b = got[0]
    assert b["input_ids"].shape == (7, 64) and bool((b["labels"] == b["input_ids"]).all())


def test_unpacked_batches_are_padded_and_masked():
    ts = tokenize_split(CharTok(), [{"dialogue": "ab", "summary": "c"}, {"dialogue": "abcdef", "summary": "ghi"}],
                        seq_len=512, packing=False)
    (b,) = list(batches(ts, 2, pad_id=0))
    short = ts.lengths[0]
    assert b["attention_mask"][0].sum() == short
    assert (b["labels"][0, short:] == -100).all() and (b["labels"][1] != -100).all()


def test_file_sources(tmp_path):
    rows = [{"dialogue": f"A: {i}", "summary": f"s{i}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = load_splits(tmp_path / "d.jsonl")
    assert [len(s[k]) for k in ("train", "val", "test")] == [36, 2, 2]
    csv_rows = "dialogue,summary,split\n" + "".join(f"\"A: {i}\",s{i},{'train' if i < 30 else 'test'}\n" for i in range(40))
    (tmp_path / "d.csv").write_text(csv_rows)
    s = load_splits(tmp_path / "d.csv")
    assert len(s["train"]) == 30 and len(s["test"]) == 10 and s["val"] == []
    folder = tmp_path / "samsum_like"
    folder.mkdir()
    for name in ("train", "val", "test"):
        (folder / f"{name}.json").write_text(json.dumps([{"id": "1", "summary": "s", "dialogue": ""}]))
    s = load_splits(folder)
    assert s["train"] == [{"dialogue": "", "summary": "s"}]  # empty dialogue kept


@pytest.mark.parametrize("content,fname,msg", [
    ("[{\"dialogue\": 1,", "bad.json", "malformed JSON"),
    (json.dumps([{"dialog": "x", "summary": "y"}]), "cols.json", "lacks column(s) ['dialogue']"),
    ("x", "d.txt", "expected a .json, .jsonl or .csv"),
    ("[]", "empty.json", "no rows"),
])
def test_bad_files_give_one_line_errors(tmp_path, content, fname, msg):
    (tmp_path / fname).write_text(content)
    with pytest.raises(ConfigError) as e:
        load_splits(tmp_path / fname)
    assert msg in str(e.value) and fname in str(e.value) and "\n" not in str(e.value)


def test_missing_source(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_splits(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.json").write_text("[]")
    with pytest.raises(ConfigError, match="no val file"):
        load_splits(tmp_path / "half")


def test_samsum_packing_matches_the_study(samsum_dir, llama2_tokenizer):
    """llama-recipes packing of SAMSum with Meta's tokenizer: 1555 / 84 / 87 chunks, 3,184,816 train tokens."""
    tok = load_tokenizer(llama2_tokenizer)
    splits = load_splits(samsum_dir)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [14732, 818, 819]
    assert sum(1 for e in splits["train"] if not e["dialogue"]) == 1  # kept, as llama-recipes did
    ts = tokenize_splits(tok, splits, 2048)
    assert ts["train"].n_tokens == 3_184_816
    assert [len(ts[k].rows) for k in ("train", "val", "test")] == [1555, 84, 87]
    assert [ts["train"].steps_per_epoch(b) for b in (1, 4, 7, 8)] == [1555, 388, 222, 194]
