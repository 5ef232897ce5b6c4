"""Tokenizers: exact Llama 2 ids through sentencepiece, the tiny preset's BPE, clear errors."""

import pytest

from loralab.config import ConfigError
from loralab.tokenizer import build_word_tokenizer, load_tokenizer


def test_llama2_ids_are_metas(llama2_tokenizer):
    tok = load_tokenizer(llama2_tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 32000)
    assert tok.encode("Hello world") == [15043, 3186]
    # Two spaces stay two pieces (transformers 5 merges them into one when built from the .model)
    assert tok.encode("I baked  cookies") == tok.sp.encode("I baked  cookies")
    assert tok.decode(tok.encode("Summary:\nok")) == "Summary:\nok"


def test_tiny_bpe_round_trip_and_specials(tmp_path):
    texts = ["Amanda: Hi Jerry! Do you want to play tennis at 5?"] * 20 + ["Jerry: Sure, where?"] * 20
    build_word_tokenizer(texts, tmp_path, vocab_size=300)
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    s = "Jerry: Sure, where? tennis at 5"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode("Jerry")) == 1  # frequent words become single tokens


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="expected a SentencePiece .model file"):
        load_tokenizer(tmp_path / "x.txt")
    with pytest.raises(ConfigError, match="neither tokenizer.model nor tokenizer.json"):
        load_tokenizer(tmp_path)
