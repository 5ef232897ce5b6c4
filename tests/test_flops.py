"""Analytic LoRA FLOPs vs torch FlopCounterMode and DeepSpeed, on a tiny Llama (CPU)."""

import pytest
import torch
from transformers import LlamaConfig

from loralab import flops
from loralab import profilers
from loralab.config import ConfigError, get_recipe
from loralab.model import build_random_model
from loralab.shape import ModelShape

TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)


def tiny_config():
    return LlamaConfig(**TINY)


def test_7b_hand_formula():
    """Llama-2-7B, LoRA r8 on q,v, input grads on, no checkpointing: the formula written out."""
    cfg = LlamaConfig(**LLAMA2_7B)
    b, s, r, L, d, V = 1, 2048, 8, 32, 4096, 32000
    T = b * s
    f = flops.lora_step_flops(ModelShape.of(cfg), batch_size=b, seq_len=s, lora_r=r,
                          lora_targets=("q_proj", "v_proj"), gradient_checkpointing=False,
                          input_requires_grad=True)
    n_lin = L * (4 * d * d + 3 * d * 11008)
    assert n_lin == 6_476_005_376  # the 6.5 B frozen decoder weights
    frozen = 4 * T * n_lin  # forward + input gradient: 2 + 2 FLOPs per weight and token
    lora = L * 2 * 6 * T * r * (d + d)  # 2 targets; forward 2, dA, dB, dx(B), dx(A): 6 per weight and token
    attn = L * 6 * (2 * b * 32 * s * s * 128)  # QK^T and PV, forward + dQ, dK, dP, dV
    head = 4 * T * d * V
    assert f.model_flops == frozen + lora + attn + head
    assert f.hardware_flops == f.model_flops
    assert f.macs == f.model_flops // 2
    # about 2/3 of full fine-tuning's 6 N per token (N = non-embedding + head weights)
    full_ft_approx = 6 * T * (n_lin + d * V) + 3 * 2 * L * 2 * b * 32 * s * s * 128
    assert 0.6 < f.model_flops / full_ft_approx < 0.7
    ck = flops.lora_step_flops(ModelShape.of(cfg), batch_size=b, seq_len=s, lora_r=r,
                           lora_targets=("q_proj", "v_proj"), gradient_checkpointing=True,
                           input_requires_grad=True)
    assert ck.model_flops == f.model_flops
    assert ck.checkpoint_recompute == f.frozen_fwd + f.lora_fwd + f.attn_fwd  # one forward of every layer


def test_causal_discount_halves_attention():
    cfg = tiny_config()
    r = get_recipe("fast")
    full = flops.recipe_step_flops(cfg, r, 2, 64)
    half = flops.recipe_step_flops(cfg, r, 2, 64, causal_attention_discount=True)
    assert half.attn_fwd * 2 == full.attn_fwd
    assert half.frozen_fwd == full.frozen_fwd


def test_layer0_without_input_grad_skips_frozen_backward():
    shape = ModelShape.of(tiny_config())
    kw = dict(batch_size=1, seq_len=32, lora_r=4, lora_targets=("q_proj", "v_proj"), gradient_checkpointing=False)
    on = flops.lora_step_flops(shape, input_requires_grad=True, **kw)
    off = flops.lora_step_flops(shape, input_requires_grad=False, **kw)
    T, d, kvd = 32, 64, 2 * 16
    # layer 0 q, k, v frozen input grads; LoRA A input grads of q, v; dK of attention
    assert on.frozen_bwd - off.frozen_bwd == 2 * T * d * (d + kvd + kvd)
    assert on.lora_bwd - off.lora_bwd == 2 * (2 * T * d * 4)
    assert on.attn_bwd - off.attn_bwd == 2 * 1 * 4 * 32 * 32 * 16


CASES = [
    ("fast", {}),  # bf16, sdpa, no checkpointing, no input grads
    ("fast", {"param_dtype": "float32", "compute_dtype": "float32"}),
    ("fast", {"gradient_checkpointing": "full"}),
    ("fast", {"attn_implementation": "eager"}),
    ("fast", {"attn_implementation": "eager", "gradient_checkpointing": "full", "param_dtype": "float32"}),
    ("fast", {"lora_targets": ("k_proj", "o_proj", "down_proj")}),
    ("seed", {"quantization": "none"}),  # the study's recipe without int8: fp32, eager, checkpointing
]


@pytest.mark.parametrize("name,over", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES])
def test_analytic_matches_flop_counter(name, over):
    """FlopCounterMode counts hardware FLOPs with full attention: the analytic hardware count within 2 %."""
    cfg = tiny_config()
    recipe = get_recipe(name).replace(**over)
    model = build_random_model(cfg, recipe, torch.device("cpu"))
    batch = profilers.random_batch(cfg.vocab_size, 2, 64, torch.device("cpu"))
    counted = profilers.count_step_flops(model, batch, recipe)
    a = flops.recipe_step_flops(cfg, recipe, 2, 64)
    assert counted["total"] == pytest.approx(a.hardware_flops, rel=0.02)
    assert counted["forward"] == pytest.approx(a.forward, rel=0.02)
    assert model.training


def test_flop_counter_linear_in_batch_size():
    cfg = tiny_config()
    recipe = get_recipe("fast")
    model = build_random_model(cfg, recipe, torch.device("cpu"))
    bs = [1, 2, 3, 4]
    counted = [profilers.count_step_flops(model, profilers.random_batch(256, b, 32, torch.device("cpu")), recipe)["total"] for b in bs]
    a, b0, r2 = flops.linear_fit_r2(bs, counted)
    assert r2 > 0.999
    assert abs(b0) < 1e-6 * a  # proportional: no fixed cost per step in matmul FLOPs


def test_int8_seed_recipe_runs_and_is_labelled():
    """Seed recipe (bitsandbytes int8): counted, and the label says what the counter cannot see."""
    cfg = tiny_config()
    recipe = get_recipe("seed")
    model = build_random_model(cfg, recipe, torch.device("cpu"))
    batch = profilers.random_batch(cfg.vocab_size, 1, 32, torch.device("cpu"))
    counted = profilers.count_step_flops(model, batch, recipe)
    a = flops.recipe_step_flops(cfg, recipe, 1, 32)
    assert 0 < counted["total"] <= a.hardware_flops * 1.02  # never more than the analytic count
    assert "bitsandbytes" in counted["convention"]


def test_deepspeed_profile_labelled_and_restores_train_mode():
    cfg = tiny_config()
    recipe = get_recipe("fast").replace(param_dtype="float32", compute_dtype="float32")
    model = build_random_model(cfg, recipe, torch.device("cpu"))
    batch = profilers.random_batch(cfg.vocab_size, 2, 64, torch.device("cpu"))
    ds = profilers.deepspeed_profile(model, batch)
    assert model.training  # get_model_profile calls model.eval(); we restore it
    assert "3 x forward" in ds["convention"] and "bitsandbytes" in ds["convention"]
    if not ds["available"]:
        pytest.skip(f"DeepSpeed profiler unavailable here: {ds['error']}")
    a = flops.recipe_step_flops(cfg, recipe, 2, 64)
    assert ds["forward_macs"] == pytest.approx(a.forward / 2, rel=0.02)  # matmul MACs agree
    assert ds["forward_flops"] >= a.forward  # DeepSpeed adds elementwise ops
    assert ds["step_flops_ds_convention"] == 3 * ds["forward_flops"]
    assert ds["step_flops_ds_convention"] > a.model_flops  # full-training convention overcounts LoRA


def test_sweep_metrics_and_peaks():
    cfg = LlamaConfig(**LLAMA2_7B)
    recipe = get_recipe("fast")
    m = flops.sweep_metrics(cfg, recipe, 4, 2048, step_time_s=2.0, peak_tflops=989.0)
    f = flops.recipe_step_flops(cfg, recipe, 4, 2048)
    assert m["flops_per_step"] == f.model_flops and m["macs_per_step"] == f.macs
    assert m["tflops_per_s"] == pytest.approx(f.model_flops / 2.0 / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 989.0)
    assert flops.sweep_metrics(cfg, recipe, 4, 2048, None, 989.0)["mfu"] is None
    assert flops.device_peak_tflops("NVIDIA H200") == 989.0
    assert flops.device_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert flops.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.device_peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5
    assert flops.device_peak_tflops("cpu") is None


def test_flops_linear_in_batch_size_7b():
    cfg = LlamaConfig(**LLAMA2_7B)
    bs = [1, 2, 4, 8]
    y = [flops.recipe_step_flops(cfg, get_recipe("seed"), b, 2048).model_flops for b in bs]
    assert flops.linear_fit_r2(bs, y)[2] > 0.999999


def test_bad_input_raises_config_error():
    shape = ModelShape.of(tiny_config())
    with pytest.raises(ConfigError):
        flops.lora_step_flops(shape, batch_size=0, seq_len=8, lora_r=8, lora_targets=("q_proj",),
                          gradient_checkpointing=False, input_requires_grad=False)
    with pytest.raises(ConfigError):
        flops.lora_step_flops(shape, batch_size=1, seq_len=8, lora_r=8, lora_targets=("qkv",),
                          gradient_checkpointing=False, input_requires_grad=False)
    with pytest.raises(ConfigError):
        flops.lora_step_flops(shape, batch_size=1, seq_len=8, lora_r=8, lora_targets=("q_proj",),
                          gradient_checkpointing=False, input_requires_grad=False, attention_kernel="flash")


def test_measure_matmul_peak_cpu():
    assert profilers.measure_matmul_peak("cpu", torch.float32, n=256) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_analytic_matches_flop_counter_cuda(attn):
    cfg = tiny_config()
    recipe = get_recipe("fast").replace(attn_implementation=attn)
    model = build_random_model(cfg, recipe, torch.device("cuda"))
    batch = profilers.random_batch(cfg.vocab_size, 2, 128, torch.device("cuda"))
    counted = profilers.count_step_flops(model, batch, recipe)
    assert counted["total"] == pytest.approx(flops.recipe_step_flops(cfg, recipe, 2, 128).hardware_flops, rel=0.02)


@pytest.mark.slow
def test_profiling_one_step_on_cpu(tmp_path):
    """Notebook 04's work on the tiny model: FLOPs three ways, a timed step, MFU; saved as the batch size's profile."""
    from loralab import profiling
    from loralab.config import RunConfig
    from loralab.results import ProfileResult
    from loralab.run_folder import RunFolder

    cfg = RunConfig(model="tiny", recipe="fast", batch_sizes=[1], seq_len=256, device="cpu").at_batch(1)
    run = RunFolder(tmp_path / "run")
    prof = profiling.run(cfg, run)
    assert prof.flop_counter["total"] == pytest.approx(prof.analytic["hardware_flops"], rel=0.02)
    assert prof.mfu > 0 and prof.flops_per_step == prof.analytic["model_flops"]
    assert prof.step_time_source.startswith("timed here") and prof.seq_len == 256 and not prof.gpu_sampled
    assert [r["batch size"] for r in prof.per_batch_size] == [1, 2, 4, 7, 8] and prof.linear_fit["r2"] == pytest.approx(1)
    assert run.load(ProfileResult, 1).flops_per_step == prof.flops_per_step == run.profile(1).flops_per_step


def test_profiling_counts_unpacked_runs_at_their_mean_row_length(tmp_path):
    """A run that trained one dialogue per row: FLOPs at the mean row length, and step times from its training."""
    from loralab import profiling
    from loralab.config import RunConfig
    from loralab.results import TrainResult
    from loralab.run_folder import RunFolder

    run = RunFolder(tmp_path)
    cfg = RunConfig(model="tiny", recipe="demo", batch_sizes=[2], seq_len=128, device="cpu").at_batch(2)
    run.save(TrainResult(status="ok", batch_size=2, tokens_per_step=130.0))
    assert profiling.flops_seq_len(cfg, run, 2)[0] == 65
    run.save(TrainResult(status="ok", batch_size=2, tokens_per_step=250.0))
    assert profiling.flops_seq_len(cfg, run, 2) == (128, "")
    run.batch_dir(2).joinpath("steps.jsonl").write_text("".join(f'{{"step": {i}, "step_time_s": {t}}}\n'
                                                                  for i, t in enumerate([9.0, 1.0, 2.0], 1)))
    assert profiling.measured_step_times(run, 2) == [1.0, 2.0]  # the warm-up step left out
