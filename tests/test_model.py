"""Model loading: presets through from_pretrained, LoRA counts, checkpointing really active."""

import pytest
import torch
from transformers import LlamaForCausalLM

from loralab.config import ConfigError, RunConfig, get_recipe
from loralab.model import add_lora, checkpointing_active, load_for_training, resolve_model_folder, trainable_parameters
from loralab.shape import preset_config


def test_lora_params_for_the_7b_shape_on_meta_device():
    """The study's 4,194,304 trainable parameters: 32 layers x (q, v) x r8 x (4096 + 4096)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(preset_config("llama2-7b"))
    peft_model = add_lora(model, get_recipe("seed").replace(gradient_checkpointing="none"))
    trainable, total = trainable_parameters(peft_model)
    assert trainable == 4_194_304 == 32 * 2 * 8 * (4096 + 4096)
    assert total - trainable == 6_738_415_616  # Llama-2-7B's parameter count
    assert round(100 * trainable / total, 2) == 0.06


def test_seed_recipe_loads_int8_with_fp32_rest():
    model, tok, info = load_for_training(RunConfig(recipe="seed", device="cpu"), progress=lambda *a: None)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear8bitLt" in kinds
    non_int8 = {p.dtype for n, p in model.named_parameters() if p.dtype != torch.int8}
    assert non_int8 == {torch.float32}  # embeddings, norms, LM head, LoRA: all fp32 (no autocast)
    assert info["attn_implementation"] == "eager" and info["checkpointing_active"]
    assert model.training


def count_layer_forwards(model, batch):
    """Forward calls of each layer's MLP: inside the checkpointed region, so recompute shows up.

    (transformers 5.24 checkpoints ``forward``, so hooks on the layer itself fire once either way.)
    """
    calls = []
    layers = model.base_model.model.model.layers
    hooks = [l.mlp.register_forward_hook(lambda *a: calls.append(1)) for l in layers]
    out = model(**batch)
    out.loss.backward()
    for h in hooks:
        h.remove()
    return len(calls), len(layers)


@pytest.mark.parametrize("recipe,expected_factor", [("seed", 2), ("fast", 1)])
def test_checkpointing_recomputes_each_layer_in_backward(recipe, expected_factor):
    model, tok, info = load_for_training(RunConfig(recipe=recipe, device="cpu"), progress=lambda *a: None)
    ids = torch.randint(4, 200, (2, 32))
    calls, n_layers = count_layer_forwards(model, {"input_ids": ids, "labels": ids})
    assert calls == expected_factor * n_layers
    assert checkpointing_active(model) == (expected_factor == 2)
    # eval mode turns checkpointing off in HF models: loralab must train in train mode
    model.eval()
    assert not checkpointing_active(model)


def test_bad_model_inputs(tmp_path):
    with pytest.raises(ConfigError, match="not a preset"):
        resolve_model_folder(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_folder(str(tmp_path))
    with pytest.raises(ConfigError, match="recipe='turbo'"):
        RunConfig(recipe="turbo")
    with pytest.raises(ConfigError, match="batch_size=0"):
        RunConfig(batch_sizes=[0])
