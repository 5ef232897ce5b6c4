"""One small tokenizer interface over SentencePiece files and Hugging Face folders.

Why not always ``AutoTokenizer``: transformers 5 builds a fast tokenizer from a
bare Llama 2 ``tokenizer.model`` that merges runs of two spaces ("▁▁"), so 840
of 14,732 SAMSum train prompts get different ids than Llama 2 gives them. A
``.model`` file (or a folder holding only one) is therefore read with
sentencepiece itself, which gives exactly Meta's ids. Folders with a
``tokenizer.json`` (an HF tokenizer, like the tiny preset's) go through
``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
from pathlib import Path

from loralab.config import ConfigError


class TextTokenizer:
    """What loralab needs of a tokenizer: ids without specials, and the special ids."""

    bos_id: int
    eos_id: int
    pad_id: int | None
    vocab_size: int
    source: str

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size}, "
                f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")


class SentencePieceTokenizer(TextTokenizer):
    """Meta's Llama 2 tokenizer.model, read with sentencepiece (exact Llama 2 ids)."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else None
        self.vocab_size = self.sp.vocab_size()
        self.source = str(model_file)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer folder with tokenizer.json."""

    def __init__(self, folder: Path):
        from transformers import PreTrainedTokenizerFast

        self.tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        special = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.exists():
            special = json.loads(cfg_file.read_text())
        self.bos_id = self._id(special.get("bos_token", "<s>"))
        self.eos_id = self._id(special.get("eos_token", "</s>"))
        pad = special.get("pad_token")
        self.pad_id = self._id(pad) if pad else None
        self.vocab_size = len(self.tok)
        self.source = str(folder)

    def _id(self, token) -> int:
        if isinstance(token, dict):
            token = token["content"]
        i = self.tok.convert_tokens_to_ids(token)
        if i is None:
            raise ConfigError(f"tokenizer {self.source if hasattr(self, 'source') else ''}: special token {token!r} not in vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A tokenizer from a SentencePiece .model file or a folder (tokenizer.json or tokenizer.model)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"tokenizer {str(path)!r}: no such file or folder (expected a tokenizer.model file or a folder with tokenizer.json or tokenizer.model)")
    if p.is_file():
        if p.suffix != ".model":
            raise ConfigError(f"tokenizer {str(path)!r}: expected a SentencePiece .model file or a tokenizer folder")
        return SentencePieceTokenizer(p)
    if (p / "tokenizer.model").exists():
        # Prefer the SentencePiece file: exact Llama 2 ids (see module docstring).
        return SentencePieceTokenizer(p / "tokenizer.model")
    if (p / "tokenizer.json").exists():
        return HFTokenizer(p)
    raise ConfigError(f"tokenizer {str(path)!r}: folder has neither tokenizer.model nor tokenizer.json")


def build_word_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 2048) -> Path:
    """Train the tiny preset's byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Deterministic for the same texts. Specials follow Llama: <unk>=0, <s>=1, </s>=2, <pad>=3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
    }, indent=1))
    return out_dir
