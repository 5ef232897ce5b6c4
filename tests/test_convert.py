"""Meta checkpoint -> HF converter, on a tiny fake Meta checkpoint built here.

The fake checkpoint comes from a random HF ``LlamaForCausalLM`` whose q/k rows
are put back into Meta's interleaved-RoPE order. Two independent checks:
  * converted HF model logits == original HF model logits (round trip);
  * an independent re-implementation of Meta's ``model.py`` forward (complex
    interleaved RoPE), run directly on the Meta tensors, gives the same logits,
    which proves the fake checkpoint really is in Meta's layout, so the
    converter's permutation is right and not merely self-consistent.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loralab import convert as conv
from loralab.config import ConfigError
from loralab.convert import convert_meta_checkpoint, intermediate_size, is_meta_checkpoint

VOCAB = 300
PARAMS = {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
          "norm_eps": 1e-5, "vocab_size": -1}


# ---------------------------------------------------------------- fixtures: tokenizer, HF model, Meta export

@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    """A tiny SentencePiece model with exactly VOCAB pieces (<unk>=0, <s>=1, </s>=2, as Llama)."""
    import sentencepiece as spm

    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fe", "gu", "hi", "jo", "be"]
    lines = [" ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(4, 12)))
             for _ in range(400)]
    out = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(out.with_suffix("")),
                                   vocab_size=VOCAB, model_type="bpe", num_threads=1, minloglevel=2)
    return out


def hf_config(params=PARAMS, vocab=VOCAB):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=params["dim"], num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"], num_key_value_heads=params.get("n_kv_heads", params["n_heads"]),
        intermediate_size=intermediate_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        rms_norm_eps=params["norm_eps"], max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
    )


@pytest.fixture(scope="session")
def hf_model():
    """Random HF Llama, weights large enough (std 0.2, norms around 1) that a layout error shows in the logits."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config()).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate_half rows -> Meta interleaved rows (inverse of convert.permute_rope)."""
    rows, dim = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, dim).transpose(1, 2).reshape(rows, dim)


def to_meta(model, params=PARAMS) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    H, KV = params["n_heads"], params.get("n_kv_heads", params["n_heads"])
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"], "rope.freqs": torch.ones(params["dim"] // H // 2)}
    for i in range(params["n_layers"]):
        h, m = f"model.layers.{i}.", f"layers.{i}."
        meta[m + "attention.wq.weight"] = unpermute(sd[h + "self_attn.q_proj.weight"], H)
        meta[m + "attention.wk.weight"] = unpermute(sd[h + "self_attn.k_proj.weight"], KV)
        meta[m + "attention.wv.weight"] = sd[h + "self_attn.v_proj.weight"]
        meta[m + "attention.wo.weight"] = sd[h + "self_attn.o_proj.weight"]
        meta[m + "feed_forward.w1.weight"] = sd[h + "mlp.gate_proj.weight"]
        meta[m + "feed_forward.w2.weight"] = sd[h + "mlp.down_proj.weight"]
        meta[m + "feed_forward.w3.weight"] = sd[h + "mlp.up_proj.weight"]
        meta[m + "attention_norm.weight"] = sd[h + "input_layernorm.weight"]
        meta[m + "ffn_norm.weight"] = sd[h + "post_attention_layernorm.weight"]
    return meta


def shard(meta: dict, n: int) -> list[dict]:
    """Split as fairscale model parallel does: column-parallel dim 0, row-parallel dim 1, embeddings dim 1."""
    def cat_dim(k):
        if k.endswith(("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")) or k == "output.weight":
            return 0
        if k.endswith(("wo.weight", "w2.weight")) or k == "tok_embeddings.weight":
            return 1
        return None
    out = [{} for _ in range(n)]
    for k, v in meta.items():
        d = cat_dim(k)
        for r, part in enumerate([v] * n if d is None else v.chunk(n, dim=d)):
            out[r][k] = part.clone()
    return out


def write_meta(folder: Path, meta: dict, n_shards=1, params=PARAMS, tokenizer: Path | None = None,
               dtype=torch.bfloat16) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    for r, sd in enumerate(shard(meta, n_shards)):
        torch.save({k: v.to(dtype) for k, v in sd.items()}, folder / f"consolidated.{r:02d}.pth")
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return folder


def meta_reference_logits(sd: dict, params: dict, tokens: torch.Tensor, theta=10000.0) -> torch.Tensor:
    """Meta's llama/model.py forward, written independently (interleaved complex RoPE), fp32."""
    dim, H = params["dim"], params["n_heads"]
    KV, hd, eps = params.get("n_kv_heads", H), dim // params["n_heads"], params["norm_eps"]
    B, T = tokens.shape
    w = {k: v.float() for k, v in sd.items()}
    rms = lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g  # noqa: E731
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd)
    freqs_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # x: (B, T, heads, hd); adjacent pairs are complex numbers
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    mask = torch.full((T, T), float("-inf")).triu(1)
    h = w["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).view(B, T, H, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).view(B, T, KV, hd)).repeat_interleave(H // KV, dim=2)
        v = (x @ w[p + "attention.wv.weight"].T).view(B, T, KV, hd).repeat_interleave(H // KV, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(hd) + mask).softmax(-1)
        h = h + (att @ v).transpose(1, 2).reshape(B, T, dim) @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        ff = F.silu(x @ w[p + "feed_forward.w1.weight"].T) * (x @ w[p + "feed_forward.w3.weight"].T)
        h = h + ff @ w[p + "feed_forward.w2.weight"].T
    return rms(h, w["norm.weight"]) @ w["output.weight"].T


PROBE = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits.float()


def load_converted(out: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()


# ---------------------------------------------------------------- correctness

def test_reference_forward_matches_hf_on_meta_layout(hf_model):
    """The independent Meta forward on the exported tensors equals HF: the export really is Meta's layout."""
    meta = to_meta(hf_model)
    torch.testing.assert_close(meta_reference_logits(meta, PARAMS, PROBE), hf_logits(hf_model), rtol=1e-4, atol=1e-4)
    # and the layout matters: HF's (un-permuted) q/k rows in the Meta forward give other logits
    wrong = dict(meta, **{f"layers.{i}.attention.w{x}.weight": hf_model.state_dict()[f"model.layers.{i}.self_attn.{x}_proj.weight"]
                          for i in range(PARAMS["n_layers"]) for x in "qk"})
    assert (meta_reference_logits(wrong, PARAMS, PROBE) - hf_logits(hf_model)).abs().max() > 1e-2


@pytest.mark.parametrize("n_shards", [1, 2])
def test_converted_logits_match(tmp_path, hf_model, sp_model, n_shards):
    meta = to_meta(hf_model)
    src = write_meta(tmp_path / "llama-2-tiny", meta, n_shards, tokenizer=sp_model, dtype=torch.float32)
    assert is_meta_checkpoint(src)
    out = convert_meta_checkpoint(src, tmp_path / "hf", dtype="float32", log=None)
    assert out == tmp_path / "hf" and not is_meta_checkpoint(out)
    conv_model = load_converted(out)
    got = hf_logits(conv_model)
    torch.testing.assert_close(got, hf_logits(hf_model), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, meta_reference_logits(meta, PARAMS, PROBE), rtol=1e-4, atol=1e-4)
    cfg = conv_model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.max_position_embeddings) == (64, 192, 2, 4, 2, VOCAB, 4096)
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_parameters["rope_theta"] == 10000.0
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


def test_converter_permutation_is_needed(tmp_path, hf_model, sp_model, monkeypatch):
    """Sensitivity: with the permutation switched off, the logits check above would fail."""
    src = write_meta(tmp_path / "m", to_meta(hf_model), tokenizer=sp_model, dtype=torch.float32)
    monkeypatch.setattr(conv, "permute_rope", lambda w, n: w)
    out = convert_meta_checkpoint(src, tmp_path / "hf", dtype="float32", log=None)
    assert (hf_logits(load_converted(out)) - hf_logits(hf_model)).abs().max() > 1e-2


def test_default_float16_and_tokenizer_files(tmp_path, hf_model, sp_model):
    from safetensors.torch import load_file

    src = write_meta(tmp_path / "m", to_meta(hf_model), tokenizer=sp_model)  # bf16, as Meta ships Llama 2
    out = convert_meta_checkpoint(src, tmp_path / "hf", log=None)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.model", "tokenizer_config.json"]
    sd = load_file(out / "model.safetensors")
    assert len(sd) == 3 + 9 * PARAMS["n_layers"] and all(t.dtype == torch.float16 for t in sd.values())
    ref = hf_model.state_dict()
    # q_proj equals the original up to bf16 (Meta file) then fp16 rounding
    torch.testing.assert_close(sd["model.layers.1.self_attn.q_proj.weight"].float(),
                               ref["model.layers.1.self_attn.q_proj.weight"], rtol=1e-2, atol=1e-2)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"]) == ("<s>", "</s>", "<unk>")
    gc = json.loads((out / "generation_config.json").read_text())
    assert (gc["bos_token_id"], gc["eos_token_id"]) == (1, 2)
    tok_mod = pytest.importorskip("loralab.tokenizer")
    tok = tok_mod.load_tokenizer(out)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (VOCAB, 1, 2)


def test_sharded_safetensors_output(tmp_path, hf_model, sp_model):
    src = write_meta(tmp_path / "m", to_meta(hf_model), 2, tokenizer=sp_model, dtype=torch.float32)
    out = convert_meta_checkpoint(src, tmp_path / "hf", dtype="float32", max_shard_bytes=100_000, log=None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert all((out / f).is_file() for f in files) and not (out / "model.safetensors").exists()
    n_params = sum(p.numel() for p in hf_model.parameters())
    assert index["metadata"]["total_size"] == 4 * n_params
    torch.testing.assert_close(hf_logits(load_converted(out)), hf_logits(hf_model), rtol=1e-5, atol=1e-5)


def test_tokenizer_in_parent_and_vocab_from_params(tmp_path, hf_model, sp_model):
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())  # Meta's download layout
    src = write_meta(tmp_path / "llama-2-7b", to_meta(hf_model), params=dict(PARAMS, vocab_size=VOCAB))
    out = convert_meta_checkpoint(src, tmp_path / "out" / "hf", log=None)
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()


def test_intermediate_size_known_models():
    assert intermediate_size(4096, 256) == 11008          # Llama 2 7B
    assert intermediate_size(5120, 256) == 13824          # Llama 2 13B
    assert intermediate_size(8192, 4096, 1.3) == 28672    # Llama 2 70B
    assert intermediate_size(64, 32) == 192               # the tiny test model


def test_permute_roundtrip_and_example():
    w = torch.arange(8.0).repeat_interleave(2).view(8, 2)   # one head, head_dim 8, rows numbered
    assert conv.permute_rope(w, 1)[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]  # evens (real parts) first
    x = torch.randn(24, 5)
    torch.testing.assert_close(unpermute(conv.permute_rope(x, 3), 3), x)


# ---------------------------------------------------------------- bad input, never overwrite

@pytest.fixture
def good_src(tmp_path, hf_model, sp_model) -> Path:
    return write_meta(tmp_path / "m", to_meta(hf_model), tokenizer=sp_model)


def one_line_error(fn, match: str):
    with pytest.raises(ConfigError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_missing_folder(tmp_path):
    assert not is_meta_checkpoint(tmp_path / "nope")
    one_line_error(lambda: convert_meta_checkpoint(tmp_path / "nope", tmp_path / "hf", log=None), "no such folder")


def test_missing_params(tmp_path, good_src):
    (good_src / "params.json").unlink()
    assert not is_meta_checkpoint(good_src)
    one_line_error(lambda: convert_meta_checkpoint(good_src, tmp_path / "hf", log=None), "no params.json")


def test_missing_consolidated(tmp_path, good_src):
    (good_src / "consolidated.00.pth").unlink()
    assert not is_meta_checkpoint(good_src)
    one_line_error(lambda: convert_meta_checkpoint(good_src, tmp_path / "hf", log=None), r"no consolidated\.\*\.pth")


def test_missing_tokenizer(tmp_path, good_src):
    (good_src / "tokenizer.model").unlink()
    one_line_error(lambda: convert_meta_checkpoint(good_src, tmp_path / "hf", log=None), "no tokenizer.model")


def test_vocab_mismatch_params(tmp_path, good_src):
    (good_src / "params.json").write_text(json.dumps(dict(PARAMS, vocab_size=32000)))
    one_line_error(lambda: convert_meta_checkpoint(good_src, tmp_path / "hf", log=None), "vocab_size 32000 does not match")


def test_vocab_mismatch_embeddings(tmp_path, hf_model, sp_model):
    meta = to_meta(hf_model)
    meta["tok_embeddings.weight"] = meta["tok_embeddings.weight"][:-4]
    src = write_meta(tmp_path / "m", meta, tokenizer=sp_model)
    one_line_error(lambda: convert_meta_checkpoint(src, tmp_path / "hf", log=None), "vocab_size mismatch")
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["m"]  # no leftovers


def test_missing_layer_tensor(tmp_path, good_src):
    (good_src / "params.json").write_text(json.dumps(dict(PARAMS, n_layers=3)))
    one_line_error(lambda: convert_meta_checkpoint(good_src, tmp_path / "hf", log=None), "missing .*layers.2")


def test_refuses_non_empty_out_dir(tmp_path, good_src):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous conversion
    one_line_error(lambda: convert_meta_checkpoint(good_src, out, log=None), "not empty")
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == "{}"


def test_empty_out_dir_is_fine(tmp_path, good_src):
    (tmp_path / "hf").mkdir()
    assert (convert_meta_checkpoint(good_src, tmp_path / "hf", log=None) / "config.json").is_file()


def test_interrupted_conversion_leaves_nothing(tmp_path, good_src, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_meta_checkpoint(good_src, tmp_path / "hf", log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---------------------------------------------------------------- CLI

def test_cli_progress_and_final_line(tmp_path, good_src, capsys):
    assert conv.main([str(good_src), str(tmp_path / "hf")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("layer ")] == ["layer 1/2 converted", "layer 2/2 converted"]
    assert lines[-1].startswith(f"converted {good_src} -> {tmp_path / 'hf'}:") and "float16" in lines[-1]


def test_cli_bad_input_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "loralab.convert", str(tmp_path / "nope"), str(tmp_path / "hf")],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr


def test_with_real_llama2_tokenizer(tmp_path, llama2_tokenizer):
    """vocab_size -1 resolved from Meta's real tokenizer.model (32000 pieces); needs LORALAB_LLAMA2_TOKENIZER."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(vocab=32000)).eval()
    src = write_meta(tmp_path / "m", to_meta(model), tokenizer=llama2_tokenizer)
    out = convert_meta_checkpoint(src, tmp_path / "hf", log=None)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (32000, 1, 2)
