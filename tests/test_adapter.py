"""adapter.py on a tiny fp32 Llama with a LoRA whose B is non-zero (so it changes outputs)."""

from __future__ import annotations

import json

import pytest
import torch

from loralab.adapter import compare_logits, export_merged, load_adapter, merge_adapter, quantization_of, save_adapter
from loralab.config import ConfigError

VOCAB = 97


def tiny_base(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def with_lora(base, seed=1):
    """LoRA r=4, alpha=8 on q/v/up; lora_B drawn at random (peft inits it to 0, which would change nothing)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture
def probe():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, VOCAB, (3, 11), generator=g)


def test_adapter_changes_outputs(probe):
    assert compare_logits(tiny_base(), with_lora(tiny_base()), probe) > 1e-2


def test_save_and_reload_gives_identical_logits_and_generation(tmp_path, probe):
    trained = with_lora(tiny_base())
    d = save_adapter(trained, tmp_path / "adapter")
    assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    reloaded = load_adapter(tiny_base(), d)
    assert compare_logits(trained, reloaded, probe) == 0.0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(trained.generate(input_ids=probe, **kw), reloaded.generate(input_ids=probe, **kw))


def test_reloaded_generation_via_evaluate_matches(tmp_path):
    from loralab.evaluate import generate_summaries

    class Ids:  # TextTokenizer stand-in over raw ids
        bos_id, eos_id, pad_id = 1, 2, 0
        decode = staticmethod(lambda ids: " ".join(map(str, ids)))

    trained = with_lora(tiny_base())
    reloaded = load_adapter(tiny_base(), save_adapter(trained, tmp_path / "a"))
    prompts = [[1, 5, 9, 33], [1, 40, 41], [1, 7, 8, 9, 10, 11]]
    a = generate_summaries(trained, Ids(), prompts, max_new_tokens=6, batch_size=2)
    b = generate_summaries(reloaded, Ids(), prompts, max_new_tokens=6, batch_size=2)
    assert a.generated_ids == b.generated_ids


def test_load_adapter_missing_folder_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="adapter_config.json"):
        load_adapter(tiny_base(), tmp_path / "nope")


def test_merge_matches_adapter_and_leaves_original_usable(probe):
    trained = with_lora(tiny_base())
    before = trained(input_ids=probe).logits.detach().clone()
    merged = merge_adapter(trained)  # inplace=False: a copy is merged
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert compare_logits(trained, merged, probe) < 1e-5
    assert torch.equal(trained(input_ids=probe).logits, before)  # the adapter model is untouched


def test_merge_inplace(probe):
    trained = with_lora(tiny_base())
    ref = trained(input_ids=probe).logits.detach().clone()
    merged = merge_adapter(trained, inplace=True)
    assert (merged(input_ids=probe).logits - ref).abs().max() < 1e-5


def test_export_loads_with_plain_transformers(tmp_path, probe):
    from transformers import AutoModelForCausalLM

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (tok_dir / "unrelated.txt").write_text("x")
    trained = with_lora(tiny_base())
    out = export_merged(trained, tmp_path / "merged", tokenizer_src=tok_dir)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file() and not (out / "unrelated.txt").exists()
    assert not any(p.name.startswith(".merged.") for p in tmp_path.iterdir())  # temp folder renamed away
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert compare_logits(trained, plain, probe) < 1e-5


def test_export_refuses_non_empty_folder(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_merged(with_lora(tiny_base()), out)
    assert (out / "keep.txt").read_text() == "mine"
    # an empty existing folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_merged(with_lora(tiny_base()), empty) / "config.json").is_file()


def test_merge_refuses_plain_model():
    with pytest.raises(ConfigError, match="PeftModel"):
        merge_adapter(tiny_base())


def test_merge_refuses_int8_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_base().save_pretrained(tmp_path / "base")
    try:
        q = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    except Exception as e:  # noqa: BLE001 - a bitsandbytes build without CPU kernels
        pytest.skip(f"int8 load on this machine failed: {e}")
    assert quantization_of(q) == "int8"
    with pytest.raises(ConfigError, match="int8-quantized"):
        merge_adapter(with_lora(q))
