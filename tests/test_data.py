"""Data: the built-in set, sources, the study's prompt, llama-recipes packing, batches."""

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

import loralab.data
import run_all
from loralab.builtin_data import make_builtin_dataset
from loralab.config import ConfigError, RunConfig
from loralab.data import (PROMPT_TEMPLATE, batches, check_trainable, format_prompt, load_splits, pack, prompt_ids,
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


ROWS = [{"dialogue": f"A: hi {i}\nB: bye", "summary": f"s{i}"} for i in range(40)]


def write(path, rows, split=None):
    """rows -> path in the format its extension names (split: a value per row for a 'split' column)."""
    df = pd.DataFrame(rows)
    if split is not None:
        df["split"] = split
    {".json": lambda: path.write_text(df.to_json(orient="records")),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[path.suffix]()
    return path


def as_lists(splits):
    return {k: list(v) for k, v in splits.items()}


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".parquet"])
def test_each_file_format_loads(tmp_path, ext):
    s = load_splits(write(tmp_path / f"d{ext}", ROWS))
    assert as_lists(s) == {"train": ROWS[:36], "val": ROWS[36:38], "test": ROWS[38:]}  # 90/5/5 by row order
    split = ["train" if i < 30 else "validation" if i < 35 else "test" for i in range(40)]
    s = load_splits(write(tmp_path / f"split{ext}", ROWS, split))
    assert as_lists(s) == {"train": ROWS[:30], "val": ROWS[30:35], "test": ROWS[35:]}


def test_folder_of_split_files_any_format(tmp_path):
    write(tmp_path / "train.parquet", [{"id": "1", "summary": "s", "dialogue": ""}] + ROWS[:3])
    write(tmp_path / "validation.jsonl", ROWS[3:4])
    write(tmp_path / "test.csv", [{"dialogue": "1.50", "summary": ""}])
    s = load_splits(tmp_path)
    assert s["train"][0] == {"dialogue": "", "summary": "s"}  # empty dialogue kept, other columns dropped
    assert s["test"][0] == {"dialogue": "1.50", "summary": ""}  # CSV cells stay text; an empty cell is ""
    assert len(s["val"]) == 1 and pd.DataFrame(s["train"][:3]).shape == (3, 2)  # notebook 01's table


def test_saved_to_disk_folders(tmp_path):
    DatasetDict({"train": Dataset.from_list(ROWS[:30]), "validation": Dataset.from_list(ROWS[30:35]),
                 "test": Dataset.from_list(ROWS[35:])}).save_to_disk(tmp_path / "dict")
    assert as_lists(load_splits(tmp_path / "dict")) == {"train": ROWS[:30], "val": ROWS[30:35], "test": ROWS[35:]}
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "one")
    assert [len(v) for v in load_splits(tmp_path / "one").values()] == [36, 2, 2]


def test_large_fields_load(tmp_path):
    """Python's csv module stops at 128 KiB a field; a 1 MB dialogue just loads."""
    big = [{"dialogue": "A: " + "word " * 200_000, "summary": "long"}] * 3
    for ext in (".csv", ".jsonl"):
        s = load_splits(write(tmp_path / f"big{ext}", big))
        assert s["train"][0] == big[0]


def jsonl_with_bad_line_31():
    lines = [json.dumps(r) for r in ROWS]
    lines[30] = '{"dialogue": "x", "summary": '
    return "\n".join(lines)


@pytest.mark.parametrize("fname,content,msg", [
    ("bad.json", '[{"dialogue": 1,', "malformed JSON at line 1"),
    ("bad.json", '[\n{"dialogue": "a", "summary": "b"},\n{"dialogue": "a" "summary": "b"}\n]', "malformed JSON at line 3"),
    ("bad.jsonl", jsonl_with_bad_line_31(), "malformed JSON at line 31,"),
    ("cols.json", json.dumps([{"dialog": "x", "summary": "y"}]), "lacks column(s) ['dialogue']; expected 'dialogue' and 'summary' (found ['dialog', 'summary'])"),
    ("cols.csv", "text,n\nx,1\n", "lacks column(s) ['dialogue', 'summary']"),
    ("d.txt", "x", "unsupported file type '.txt'"),
    ("empty.jsonl", "", "empty file"),
    ("empty.json", "[]", "no rows"),
    ("header.csv", "dialogue,summary\n", "no rows"),
    ("latin1.csv", b"dialogue,summary\nok,ok\ncaf\xe9,x\n", "not UTF-8 text (byte 0xe9 at offset 26, line 3)"),
    ("ragged.csv", "dialogue,summary\na,b\nc,d,e\n", "Expected 2 fields in line 3, saw 3"),
    ("bad.parquet", "not parquet", "could not read it as PARQUET"),
    ("one.jsonl", json.dumps(ROWS[0]), "1 row; a 90/5/5 split by row order needs at least 2 rows"),
    ("nosplit.csv", "dialogue,summary,split\na,b,test\n", "no row has split 'train' (found ['test'])"),
    ("nested.jsonl", '{"dialogue": {"a": 1}, "summary": "b"}\n' * 3, "'dialogue' and 'summary' must be text"),
])
def test_bad_files_give_one_line_errors(tmp_path, fname, content, msg):
    p = tmp_path / fname
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError) as e:
        load_splits(p)
    assert msg in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_bad_folders(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_splits(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train.json").write_text("[]")
    with pytest.raises(ConfigError, match="no val file"):
        load_splits(tmp_path / "half")
    DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ConfigError, match=r"saved DatasetDict has no val split \(found \['test', 'train'\]\)"):
        load_splits(tmp_path / "dd")
    Dataset.from_list(ROWS[:1]).save_to_disk(tmp_path / "one")
    with pytest.raises(ConfigError, match="'.*one': 1 row; a 90/5/5 split"):
        load_splits(tmp_path / "one")


def test_check_trainable_names_the_data_and_the_batch():
    ts = tokenize_split(CharTok(), ROWS[:10], seq_len=160)
    assert len(ts.rows) == 3
    check_trainable(ts, 3, "d.jsonl")
    with pytest.raises(ConfigError) as e:
        check_trainable({"train": ts}, 8, "d.jsonl")
    assert str(e.value) == ("data 'd.jsonl': 3 training chunks of 160 tokens; batch size 8 needs at least 8 "
                            "(use a smaller --batch-sizes or --seq-len, or more data)")
    with pytest.raises(ConfigError, match="2 training rows .one dialogue each.; batch size 4 needs at least 4"):
        check_trainable(ROWS[:2], 4, "d.jsonl")


def test_run_all_stops_on_data_too_small_for_the_batch(tmp_path, capsys):
    data = write(tmp_path / "small.jsonl", make_builtin_dataset()["train"][:40])
    rc = run_all.main(["--data", str(data), "--batch-sizes", "1", "8", "--seq-len", "1024", "--packing",
                       "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not (tmp_path / "out").exists()
    assert "training chunks of 1024 tokens; batch size 8 needs at least 8" in err and str(data) in err


def word_tokenizer(folder, texts):
    from loralab.tokenizer import build_word_tokenizer

    return load_tokenizer(build_word_tokenizer(texts, folder, vocab_size=300))


def test_tokenized_splits_are_cached_in_loralab_home(tmp_path, monkeypatch):
    data = write(tmp_path / "d.parquet", make_builtin_dataset()["train"][:200])
    tok = word_tokenizer(tmp_path / "tok", [format_prompt(e) for e in ROWS])
    calls = []
    encode = tok.encode
    tok.encode = lambda text: calls.append(1) or encode(text)
    cache = Path(os.environ["LORALAB_HOME"]) / "datasets" / "tokenized"
    before = set(cache.glob("*.arrow"))
    first = tokenize_split(tok, load_splits(data)["train"], 128)
    assert len(calls) == 180
    made = set(cache.glob("*.arrow")) - before
    assert len(made) == 2  # the prompt ids and the chunks
    again = tokenize_split(tok, load_splits(data)["train"], 128)  # a fresh load: same bytes, same fingerprint
    assert len(calls) == 180 and set(cache.glob("*.arrow")) - before == made  # nothing tokenized or written again
    assert (again.rows == first.rows).all() and again.n_tokens == first.n_tokens
    other = tokenize_split(tok, load_splits(data)["train"], 64)  # another seq_len: packed again, not tokenized
    assert len(calls) == 180 and len(other.rows) == first.n_tokens // 64
    with monkeypatch.context() as m:  # another prompt template: tokenized again
        m.setattr(loralab.data, "PROMPT_TEMPLATE", "Dialog:\n{dialog}\nSummary:\n")
        tokenize_split(tok, load_splits(data)["train"], 128)
    assert len(calls) == 360
    write(data, make_builtin_dataset()["train"][1:201])  # other data: tokenized again
    n_tokens = tokenize_split(tok, load_splits(data)["train"], 128).n_tokens
    assert len(calls) == 540
    other_tok = word_tokenizer(tmp_path / "tok2", [format_prompt(e) for e in ROWS[:5]])  # another tokenizer file
    assert tokenize_split(other_tok, load_splits(data)["train"], 128).n_tokens != n_tokens


@pytest.mark.parametrize("kind", ["parquet", "saved"])
def test_parquet_and_saved_folder_train_end_to_end(tmp_path, kind):
    """Through the library's one training entry point (loralab.train.run_training), on CPU."""
    from loralab.train import run_training

    rows = make_builtin_dataset()["train"][:100]
    data = (write(tmp_path / "d.parquet", rows) if kind == "parquet"
            else Dataset.from_list(rows).save_to_disk(tmp_path / "saved") or tmp_path / "saved")
    cfg = RunConfig(data=str(data), batch_sizes=[2], seq_len=128, max_steps=2, device="cpu", recipe="demo")
    r = run_training(cfg, tmp_path / "run", progress=lambda *a: None)
    assert r.status == "ok" and r.steps_done == 2 and len(r.losses) == 2 and all(l > 0 for l in r.losses)


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
