"""The planner (loralab.plan, cards, timemodel, value) on CPU: no GPU, no weights."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loralab import cards as C
from loralab import plan as P
from loralab import timemodel as TM
from loralab.config import ConfigError, RunConfig, get_recipe, parse_lora_targets
from loralab.shape import ModelShape, preset_config
from loralab.value import rouge_per_gpu_hour

ROOT = Path(__file__).resolve().parents[1]


def run_all(*args: str, env_home: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "LORALAB_HOME": str(env_home), "PYTHONPATH": str(ROOT / "lib")}
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_catalogue_has_the_default_cards_with_sources():
    cat = C.catalogue()
    for name in C.default_cards():
        c = cat[name]
        assert c.memory_gib > 0 and c.bandwidth_gbs > 0 and c.peak("bf16") > 0 and c.source
    assert not cat["A100-40GB"].fp8 and cat["H200"].fp8 and cat["L4"].fp8 and not cat["A10G"].fp8
    assert C.get_card("a100 40gb").name == "A100-40GB"


def test_mfu_peaks_come_from_the_catalogue():
    from loralab.flops import device_peak_tflops

    assert device_peak_tflops("NVIDIA H200") == C.get_card("H200").peak("bf16") == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5
    assert device_peak_tflops("cpu") is None


def test_plan_of_the_tiny_model_on_cpu(tmp_path):
    """The tiny preset (its config only) on two cards: rows, a best choice, JSON fields, and costs with a price."""
    cfg = preset_config("tiny")
    cards = [C.get_card("L4"), C.get_card("A100-40GB")]
    rows = P.plan(cfg, [get_recipe("demo"), get_recipe("fast8")], cards, seq_len=128, tokens=128 * 500,
                  prices={"L4": 0.8})
    assert len(rows) == 4
    demo_l4 = next(r for r in rows if r.card == "L4" and r.recipe == "demo")
    assert demo_l4.fits and demo_l4.batch_size >= 1 and demo_l4.tokens_per_s > 0 and demo_l4.epoch_s > 0
    assert demo_l4.usd_per_epoch == pytest.approx(demo_l4.epoch_s / 3600 * 0.8)
    a100_fp8 = next(r for r in rows if r.card == "A100-40GB" and r.recipe == "fast8")
    assert not a100_fp8.fits and "FP8" in a100_fp8.note
    assert set(P.best_per_card(rows)) == {"L4", "A100-40GB"}
    assert set(demo_l4.as_json()) >= {"card", "recipe", "batch_size", "fits", "peak_gib", "tokens_per_s", "epoch_s",
                                      "usd_per_epoch"}


def test_run_all_plan_json_for_a_local_config_json(tmp_path):
    """`run_all.py --plan --json` on a folder holding only config.json (no weights), chosen cards and batch sizes."""
    folder = tmp_path / "m"
    folder.mkdir()
    preset_config("tiny").save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    r = run_all("--plan", "--json", "--model", str(folder), "--recipes", "demo", "--cards", "L4", "H200",
                "--batch-sizes", "1", "2", "--seq-len", "128", "--tokens", "64000", "--price", "H200=3.5",
                env_home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["card"], x["batch_size"]) for x in rows] == [("L4", 1), ("L4", 2), ("H200", 1), ("H200", 2)]
    assert all(x["fits"] for x in rows) and rows[-1]["usd_per_epoch"] > 0 and rows[0]["usd_per_epoch"] is None


def test_run_all_plan_table_names_the_best_choice(tmp_path):
    r = run_all("--plan", "--model", "llama2-7b", "--recipes", "seed", "fast", "--cards", "A100-40GB",
                env_home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    assert "Best choice per card" in r.stdout and "**A100-40GB**" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--cards", "B300"], "card 'B300': not in the catalogue"),
    (["--price", "A100-80GB=cheap"], "--price 'A100-80GB=cheap': expected CARD=USD_PER_GPU_HOUR"),
    (["--price", "A100-80GB=-1"], "expected CARD=USD_PER_GPU_HOUR"),
    (["--lora-targets", "q,w"], "--lora-targets 'w'"),
])
def test_plan_errors_are_one_line(tmp_path, args, words):
    r = run_all("--plan", "--model", "llama2-7b", "--recipes", "fast", *args, env_home=tmp_path / "home")
    assert r.returncode == 2
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_shape_that_fits_nowhere_is_a_one_line_error(tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(folder)
    r = run_all("--plan", "--model", str(folder), "--recipes", "fast", env_home=tmp_path / "home")
    assert r.returncode == 2 and "fits on none of the cards" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cards_file_extends_the_catalogue(tmp_path):
    f = tmp_path / "cards.json"
    f.write_text(json.dumps({"cards": {"MyCard": {"memory_gib": 32, "bandwidth_gbs": 900,
                                                  "tflops": {"fp32": 40, "bf16": 200, "int8": 400},
                                                  "source": "made up for a test"}}}))
    cat = C.catalogue(f)
    assert "MyCard" in cat and "H200" in cat and cat["MyCard"].capacity_gib == pytest.approx(32 * C.USABLE_FRACTION)
    f.write_text(json.dumps({"cards": {"Bad": {"memory_gib": 32}}}))
    with pytest.raises(ConfigError, match="card 'Bad'"):
        C.catalogue(f)


def test_lora_options_reach_the_recipe_and_the_models():
    assert parse_lora_targets("q,v") == ("q_proj", "v_proj")
    assert len(parse_lora_targets("all-linear")) == 7
    cfg = RunConfig.from_options(model="tiny", recipe="seed", lora_r=16, lora_alpha=64, lora_targets="all-linear")
    assert (cfg.recipe.lora_r, cfg.recipe.lora_alpha, len(cfg.recipe.lora_targets)) == (16, 64, 7)
    shape = preset_config("llama2-7b")
    from loralab.memory import predict_peak

    qv, al = get_recipe("fast"), cfg.recipe.replace(**{k: getattr(get_recipe("fast"), k) for k in ("quantization",
                                                                                                  "param_dtype")})
    al = get_recipe("fast").replace(lora_r=16, lora_targets=parse_lora_targets("all-linear"))
    assert predict_peak(shape, al, 1, 2048).total > predict_peak(shape, qv, 1, 2048).total
    h200, cal = C.get_card("H200"), TM.Calibration.load()
    assert TM.predict_step(shape, al, 1, 2048, h200, cal).gpu_s > TM.predict_step(shape, qv, 1, 2048, h200, cal).gpu_s


def test_llama31_8b_preset_and_gqa():
    s = ModelShape.of(preset_config("llama3.1-8b"))
    assert (s.nkv, s.V, s.total_params()) == (8, 128256, 8_030_261_248)
    st = TM.predict_step(preset_config("llama3.1-8b"), get_recipe("fast"), 2, 2048, C.get_card("H200"), TM.Calibration.load())
    assert st.tokens_per_s > 0 and {"frozen_gemm", "attention", "elementwise"} <= set(st.parts)


def test_time_model_parts_add_up_and_host_bounds_the_step():
    cal = TM.Calibration.load()
    st = TM.predict_step(preset_config("llama2-7b"), get_recipe("seed"), 4, 2048, C.get_card("H200"), cal)
    assert st.step_s == max(st.gpu_s, st.host_s) and st.gpu_s == pytest.approx(sum(st.parts.values()))
    assert st.table()[-1]["ms"] == pytest.approx(st.step_s * 1e3)
    with pytest.raises(ConfigError, match="FP8 tensor cores"):
        TM.predict_step(preset_config("llama2-7b"), get_recipe("fast8"), 1, 2048, C.get_card("A100-40GB"), cal)


def test_study_table_check_over_the_committed_calibration():
    """The A100-40GB plan of the study's recipe against the study's table (checks, never inputs). What holds today:
    memory within 5 % at batches 4 and 7 and the OOM at 8. Batch 1's 9.31 GiB is the study's own arithmetic
    (Table 1), not a measurement: the H200 measured 12.61 GiB device memory there, and the plan says 12.57.
    Epoch time is the open item (bar 15 %): see test_study_epoch_time_within_15_percent."""
    rows = {r["batch_size"]: r for r in P.study_check()}
    assert [rows[b]["fits"] for b in (1, 4, 7, 8)] == [True, True, True, False]
    assert abs(rows[4]["mem_err_pct"]) < 5 and abs(rows[7]["mem_err_pct"]) < 5
    assert (rows[4]["steps"], rows[7]["steps"]) == (388, 222)


@pytest.mark.xfail(strict=True, reason="efficiencies carried from the H200 as fractions of each card's data-sheet peak "
                   "put the study's A100 epoch ~40 % above its measured 5,003 / 5,073 s: the seed step is fp32 SIMT GEMMs "
                   "(no TF32), and Hopper's FP32 peak (dual-issue) is reached less well than Ampere's; not tuned away")
def test_study_epoch_time_within_15_percent():
    rows = {r["batch_size"]: r for r in P.study_check()}
    assert abs(rows[4]["time_err_pct"]) < 15 and abs(rows[7]["time_err_pct"]) < 15


def test_rouge_l_per_gpu_hour_and_dollar():
    v = rouge_per_gpu_hour(0.10, 0.40, train_seconds=1800, gpus=2, usd_per_gpu_hour=2.0)
    assert v.gpu_hours == pytest.approx(1.0) and v.rouge_l_per_gpu_hour == pytest.approx(0.30)
    assert v.usd == pytest.approx(2.0) and v.rouge_l_per_usd == pytest.approx(0.15)
    assert rouge_per_gpu_hour(0.1, 0.2, 3600).rouge_l_per_usd is None
    with pytest.raises(ConfigError, match="rouge_l_tuned"):
        rouge_per_gpu_hour(0.1, 1.5, 10)


def test_calibration_benchmark_smoke(tmp_path):
    """benchmarks/time_calibration.py --smoke runs on CPU and writes a calibration the planner can read."""
    import os

    env = {**os.environ, "LORALAB_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT / "lib")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_calibration.py"), "--smoke", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = list(tmp_path.glob("time_calibration_smoke_*.json"))
    assert out and TM.Calibration.load(out[0]).efficiency["gemm_bf16"] > 0
