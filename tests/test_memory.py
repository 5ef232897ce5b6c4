"""Memory math: analytic terms pinned for the 7B shape, activations checked against live bytes on CPU."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from loralab import memory
from loralab import study
from loralab.autobatch import find_batch_size, largest_batch_that_fits
from loralab.config import ConfigError, Recipe, get_recipe
from loralab.shape import lora_param_count, param_count, preset_config

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def cfg7b():
    return preset_config("llama2-7b")


def test_param_counts_7b(cfg7b):
    assert param_count(cfg7b) == 6_738_415_616
    assert lora_param_count(cfg7b, get_recipe("seed")) == 4_194_304  # 32 * 2 * 8 * (4096 + 4096)
    r = get_recipe("seed").replace(lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_r=16)
    assert lora_param_count(cfg7b, r) == 32 * 4 * 16 * 8192


def test_full_finetune_84gb(cfg7b):
    f = study.full_finetune_fp16(cfg7b)
    assert f["study_gb"] == pytest.approx(84.0)  # 7e9 x (2 + 2 + 8) B
    assert "7e9 params x (2 + 2 + 8) B = 84 GB" in f["study_formula"]  # what notebook 02 prints
    assert f["total_12B_gb"] == pytest.approx(6_738_415_616 * 12 / 1e9)  # 80.86 GB
    assert f["with_fp32_master_gb"] == pytest.approx(6_738_415_616 * 16 / 1e9)


def test_adamw_two_states_and_table1(cfg7b):
    bd = memory.predict_peak(cfg7b, get_recipe("seed"), 1, 2048)
    assert bd.terms["optimizer_states"] == 2 * 4 * 4_194_304
    assert bd.terms["lora_gradients"] == 4 * 4_194_304
    rows = {r["term"]: r for r in study.table1(cfg7b)}
    assert rows["optimizer"]["study_GB"] == 0.0168
    assert rows["optimizer"]["loralab_GB"] == pytest.approx(0.0336, abs=1e-4)
    assert rows["total"]["study_GB"] == pytest.approx(10.002)
    assert rows["total"]["study_GB"] * 1e9 / 2**30 == pytest.approx(9.31, abs=0.01)


def test_weights_7b(cfg7b):
    n_lin = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    other = 2 * 32000 * 4096 + 65 * 4096
    w8 = memory.weight_terms(cfg7b, get_recipe("seed"))
    assert w8["weights_int8"][0] == n_lin + 4 * 32 * (4 * 4096 + 2 * 11008 + 4096)
    assert w8["weights_embed_head_norms"][0] == 4 * other  # fp32 after prepare_model_for_kbit_training
    w4 = memory.weights_bytes(cfg7b, get_recipe("qlora"))
    assert w4 == pytest.approx(n_lin * 4.127 / 8 + 4 * other, rel=1e-3)  # QLoRA: 4.127 bits/param
    assert memory.weights_bytes(cfg7b, get_recipe("fast")) == 2 * (n_lin + other)


def test_predictions_monotonic_and_ordered(cfg7b):
    seed = [memory.predict_peak(cfg7b, get_recipe("seed"), b, 2048).total for b in (1, 2, 4, 8)]
    assert seed == sorted(seed)
    sdpa = memory.predict_peak(cfg7b, get_recipe("seed-sdpa"), 8, 2048).total
    assert sdpa < seed[-1]  # no S x S tensors
    nock = memory.predict_peak(cfg7b, get_recipe("lora-bf16"), 4, 2048).total
    ck = memory.predict_peak(cfg7b, get_recipe("lora-bf16-ckpt"), 4, 2048).total
    assert ck < nock
    bd = memory.predict_peak(cfg7b, get_recipe("seed"), 4, 2048)
    assert bd.reserved == bd.total - int(memory.CUDA_CONTEXT_GIB * memory.GIB)
    assert sum(r["GiB"] for r in bd.to_gib()[:-3]) == pytest.approx(bd.total / memory.GIB)
    assert "| term |" in bd.markdown()


def test_largest_batch(cfg7b):
    r = get_recipe("seed")
    b = largest_batch_that_fits(cfg7b, r, 2048, 40)
    assert b >= 1
    assert memory.predict_peak(cfg7b, r, b, 2048).total <= 40 * memory.GIB < memory.predict_peak(cfg7b, r, b + 1, 2048).total
    assert largest_batch_that_fits(cfg7b, r, 2048, 5) == 0
    assert largest_batch_that_fits(cfg7b, r, 2048, 40, allocator_cap=True) >= b


def test_bad_input(cfg7b):
    with pytest.raises(ConfigError):
        memory.predict_peak(cfg7b, get_recipe("seed"), 0, 2048)
    with pytest.raises(ConfigError):
        memory.predict_peak(cfg7b, get_recipe("seed"), 1, 2048, optimizer="lion")
    with pytest.raises(ConfigError):
        find_batch_size(lambda b: 1.0, lambda b: 1.0, 0)


def test_finder_steps_down_on_injected_oom():
    pred = lambda b: 2.0 * b  # predicts 20 fits in 40 GiB
    calls = []

    def step(b):
        calls.append(b)
        if b > 17:  # reality is worse than predicted
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return 2.1 * b

    f = find_batch_size(pred, step, 40.0)
    assert calls == [20, 19, 18, 17]
    assert f.chosen == 17 and f.predicted_gib == 34.0
    assert f.measured_gib == pytest.approx(35.7) and f.headroom_gib == pytest.approx(4.3)
    f = find_batch_size(pred, lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), 40.0, start=3)
    assert f.chosen == 0 and f.measured_gib is None and len(f.tried) == 3


TINY = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=512, tie_word_embeddings=False)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ckpt", [True, False])
def test_activation_peak_matches_live_bytes_cpu(attn, ckpt):
    """Predicted step memory (minus weights/adapter/optimizer) vs the live-bytes peak of a real fp32
    LoRA step on CPU (tensors alive at once, as a non-caching allocator would hold them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from memtrack import LiveBytes

    warnings.filterwarnings("ignore")
    cfg = LlamaConfig(**TINY)
    rec = Recipe(name="t", quantization="none", param_dtype="float32", attn_implementation=attn,
                 gradient_checkpointing="full" if ckpt else "none", prepare_for_kbit=False)
    torch.manual_seed(0)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation=attn)
    m.config.use_cache = False
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
    m = get_peft_model(m, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    m.train()
    B, S = 2, 128
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    with LiveBytes(list(m.parameters()) + list(m.buffers())) as lb:
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
    bd = memory.predict_peak(cfg, rec, B, S, device="cpu", include_context=False)
    t = bd.terms
    pred = bd.allocated - sum(v for k, v in t.items() if k.startswith("weights")) - t["lora_adapter"] - t["optimizer_states"]
    tol = 0.03 if ckpt else 0.08  # no-ckpt: CPU dropout bookkeeping differs a little from the GPU's
    assert pred == pytest.approx(lb.peak, rel=tol), (pred, lb.peak, bd.phase)


@pytest.mark.slow
def test_notebook_02_executes(tmp_path):
    pm = pytest.importorskip("papermill")
    import jupytext

    src = Path(__file__).parents[1] / "notebooks" / "02_memory_math.py"
    nb = jupytext.read(src)
    ipynb = tmp_path / "02.ipynb"
    jupytext.write(nb, ipynb)
    out = tmp_path / "02_out.ipynb"
    pm.execute_notebook(str(ipynb), str(out), kernel_name="python3", cwd=str(src.parent),
                        parameters={"batch_sizes": [1, 2, 4, 7, 8]})
    import nbformat

    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
    assert all(c.get("execution_count") for c in executed.cells if c.cell_type == "code" and c.source.strip())
    text = out.read_text()
    assert "7e9 params x (2 + 2 + 8) B = 84 GB" in text  # the study's Figure 1, recomputed


@pytest.mark.slow
def test_memory_sweep_smoke(tmp_path):
    import subprocess

    root = Path(__file__).parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "memory_sweep.py"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import json

    data = json.loads((tmp_path / "memory_sweep.json").read_text())
    assert data["rows"] and all("predicted_reserved_gib" in row for row in data["rows"])
    assert (tmp_path / "memory_sweep.md").exists()


# --- the model against the committed H200 measurements (benchmarks/results) -------------------------
_RES = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
_SWEEP = _RES / "memory_sweep_H200_20261130.json"
"""The calibration run (1 step per point): the allocator constants were chosen on it."""
_FRESH = [_RES / "memory_sweep_H200_20261130-0937_seed.json", _RES / "memory_sweep_H200_20261130-0955_qlora-lora.json"]
"""The independent run (2 steps per point, measured after the calibration, constants unchanged)."""
_KNOWN_MISSES = {
    "calibration": {("qlora", 1), ("qlora", 2), ("qlora", 16)},
    "fresh": {("seed-sdpa", 8), ("seed-sdpa", 16), ("qlora", 8), ("qlora", 16)},
    "loralab": {("seed-sdpa", 8, "caching"), ("seed-sdpa", 16, "caching")},
}
"""Rows the current model misses by > 5 %. The allocated peak is within 2 % on every row of both runs; the misses
are the caching allocator's reserved - allocated (all sweeps before 12:00 ran every recipe under it): seed-sdpa bs 16
read 49.10, 50.64 and 50.44 GiB reserved in three runs for the same 39.64 allocated. qlora bs 1 read 7.69 GiB in the
calibration run, where it followed the seed group in one process (the int8 model's leftover segments), and 6.82 in
its own process. loralab now runs qlora (and every recipe but seed) with expandable segments: the "loralab" run.
strict xfail: a fix turns them into failures to remove from this set."""


_LORALAB = [(_RES / "memory_sweep_H200_20261130-1231_all.json", {"seed", "seed-sdpa", "lora-bf16-ckpt", "lora-bf16"}),
            (_RES / "memory_sweep_H200_20261130-1239_qlora.json", {"qlora"}),
            (_RES / "memory_sweep_H200_20261130-1248_seed-sdpa-expandable.json", {"seed-sdpa"})]
"""The independent run after the expandable-segments calibration (memory_sweep_H200_20261130-1219_expandable), each
recipe under the allocator loralab gives it, plus seed-sdpa under the caching allocator. qlora's rows of the 12:31
sweep are left out: it ran after the seed group in one process and 2 of the int8 model's segments were still reserved
(memory_sweep.py now runs each group in its own process); its own sweep (12:39) stands in."""


def _sweep_rows():
    import json

    out = []
    for name, paths in (("calibration", [(_SWEEP, None)]), ("fresh", [(p, None) for p in _FRESH]), ("loralab", _LORALAB)):
        for p, recipes in paths:
            out += [(name, r) for r in json.loads(p.read_text())["rows"]
                    if r["status"] == "ok" and (recipes is None or r["recipe"] in recipes)]
    return out


@pytest.mark.parametrize("run,row", _sweep_rows(), ids=lambda x: x if isinstance(x, str) else f"{x['recipe']}-bs{x['batch_size']}")
def test_reserved_within_5pct_of_h200(cfg7b, run, row, request):
    if {(row["recipe"], row["batch_size"]), (row["recipe"], row["batch_size"], row.get("allocator"))} & _KNOWN_MISSES[run]:
        request.applymarker(pytest.mark.xfail(strict=True, reason="known miss, see _KNOWN_MISSES"))
    # these sweeps ran every recipe under PyTorch's default (caching) allocator
    recipe = get_recipe(row["recipe"]).replace(allocator=row.get("allocator", "caching"))
    bd = memory.predict_peak(cfg7b, recipe, row["batch_size"], row["seq_len"])
    assert bd.reserved / memory.GIB == pytest.approx(row["reserved_gib"], rel=0.05)
    assert bd.allocated / memory.GIB == pytest.approx(row["allocated_gib"], rel=0.02)


@pytest.mark.parametrize("name,measured", [("seed", 7), ("seed-sdpa", 16), ("qlora", 19), ("lora-bf16-ckpt", 21), ("lora-bf16", 3)])
def test_largest_batch_under_40gib_cap_as_loralab_runs(cfg7b, name, measured):
    """Each recipe under its own allocator (seed: caching; the others: expandable segments); measured by the cap
    searches of memory_sweep_H200_20261130-1231_all / -1239_qlora / -1248_seed-sdpa-expandable (seed: also seed_sweep)."""
    assert largest_batch_that_fits(cfg7b, get_recipe(name), 2048, 40, allocator_cap=True) == measured


def test_allocator_choice_per_recipe():
    """seed keeps PyTorch's default allocator: it reproduces the study, whose batch 8 ran out of memory on 40 GB."""
    assert get_recipe("seed").allocator == "caching"
    assert {get_recipe(n).allocator for n in ("fast", "qlora", "demo")} == {"expandable"}
    assert get_recipe("seed-sdpa").allocator == "expandable"


def test_expandable_allocator_terms(cfg7b):
    """Expandable segments: reserved = allocated + 0.22 GiB + 0.17 x the loss-backward blocks; under a cap the loss
    part is unmapped and retried (reserved_under_cap = allocated + 0.22 GiB). Caching: the larger fragmentation terms."""
    r = get_recipe("lora-bf16")
    bd = memory.predict_peak(cfg7b, r, 16, 2048)
    loss = bd.info["phases_gib"]["loss backward"] * memory.GIB
    assert bd.reserved - bd.allocated == pytest.approx(0.22 * memory.GIB + 0.17 * loss, rel=1e-9)
    assert bd.info["reserved_under_cap"] == pytest.approx(bd.allocated + 0.22 * memory.GIB, rel=1e-12)
    # 16 x 2048 tokens x 12 V bytes (fp32 log-softmax out, its grad, the logits' grad) = 11.72 GiB at least
    assert loss >= 16 * 2048 * 12 * 32000
    caching = memory.predict_peak(cfg7b, r.replace(allocator="caching"), 16, 2048)
    assert caching.allocated == bd.allocated and caching.reserved - caching.allocated > bd.reserved - bd.allocated


@pytest.mark.parametrize("name,measured", [
    ("seed", 7), ("lora-bf16", 3),
    pytest.param("lora-bf16-ckpt", 19, marks=pytest.mark.xfail(strict=True, reason="calibration run; model says 20")),
    pytest.param("lora-bf16-ckpt", 16, marks=pytest.mark.xfail(strict=True, reason="fresh run, 2 steps; model says 20")),
    pytest.param("seed-sdpa", 11, marks=pytest.mark.xfail(strict=True, reason="fresh run; model says 13")),
    pytest.param("seed-sdpa", 12, marks=pytest.mark.xfail(strict=True, reason="12:31 run; model says 13")),
    pytest.param("qlora", 14, marks=pytest.mark.xfail(strict=True, reason="fresh run; model says 15")),
])
def test_largest_batch_under_40gib_cap_matches_h200(cfg7b, name, measured):
    """Under PyTorch's default (caching) allocator, as the sweeps before 12:00 ran every recipe."""
    recipe = get_recipe(name).replace(allocator="caching")
    assert largest_batch_that_fits(cfg7b, recipe, 2048, 40, allocator_cap=True) == measured


def test_model_check_script_matches_committed(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("mmc", _RES.parent / "memory_model_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.check()
    committed = json.loads((_RES / "memory_model_check_H200_20261130.json").read_text())
    assert res["summary"] == committed["summary"]  # re-run benchmarks/memory_model_check.py after model changes
    fresh = mod.check(_FRESH, independent=True)
    committed = json.loads((_RES / "memory_model_check_H200_20261130-fresh.json").read_text())
    assert fresh["summary"] == committed["summary"]
    specs = [(p, recipes) for p, recipes in _LORALAB]
    loralab = mod.check(specs, independent=True)
    committed = json.loads((_RES / "memory_model_check_H200_20261130-loralab.json").read_text())
    assert loralab["summary"] == committed["summary"]
    assert committed["summary"]["as_loralab_runs"] == {"rows": 25, "within_tol": 25, "largest_known": 5, "largest_match": 5}
