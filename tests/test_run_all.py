"""run_all.py as a user runs it: bad input, the whole sweep end to end, no overwrite, failed notebooks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import run_all
from loralab import preflight

REPO = Path(__file__).resolve().parents[1]


def bad_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"dialogue": "x", ')
    return str(p)


def no_columns(tmp_path):
    p = tmp_path / "cols.jsonl"
    p.write_text('{"text": "x"}\n')
    return str(p)


@pytest.mark.parametrize("args,expected", [
    (["--model", "no/such/model"], "model 'no/such/model': not a preset"),
    (["--data", "no/such/data"], "data 'no/such/data': no such file or folder"),
    (["--tokenizer", "no/such/tok"], "tokenizer 'no/such/tok': no such file or folder"),
    (["--recipe", "turbo"], "recipe='turbo': expected one of seed, fast"),
    (["--attn", "flash"], "attn='flash': expected one of eager, sdpa"),
    (["--batch-sizes", "4", "0"], "--batch-sizes 0: expected integers >= 1"),
    (["--batch-sizes", "four"], "--batch-sizes 'four': expected integers >= 1"),
    (["--max-steps", "0"], "max_steps=0: expected an integer >= 1"),
    (["--model", "llama2-7b"], "the llama2-7b preset has no tokenizer"),
    ("BAD_JSON", "malformed JSON"),
    ("NO_COLUMNS", "lacks column(s) ['dialogue', 'summary']"),
])
def test_bad_input_is_one_line_exit_2_and_no_folder(tmp_path, capsys, args, expected):
    if args == "BAD_JSON":
        args = ["--data", bad_json(tmp_path)]
    elif args == "NO_COLUMNS":
        args = ["--data", no_columns(tmp_path)]
    out = tmp_path / "outputs"
    rc = run_all.main(args + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("run_all.py: error: ") and expected in err and "\n" not in err
    assert not out.exists() or not any(out.iterdir())


def test_bad_input_exit_code_from_the_shell(tmp_path):
    r = subprocess.run([sys.executable, "run_all.py", "--recipe", "turbo", "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "recipe='turbo'" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_whole_sweep_end_to_end(tmp_path):
    """The real entry point on the tiny model: every notebook, HTML, index, summary.json; then no overwrite."""
    out = tmp_path / "outputs"
    cmd = [sys.executable, "run_all.py", "--batch-sizes", "1", "2", "--max-steps", "2", "--seq-len", "128",
           "--eval-examples", "4", "--out", str(out), "--run-id", "e2e"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-2000:]
    run = out / "e2e"
    lines = r.stdout.splitlines()
    assert any("03_training bs2" in l and "ok" in l for l in lines)
    assert lines[-1].startswith("loralab: complete") and str(run / "index.html") in lines[-1]
    for stem in ["00_setup", "01_data", "02_memory_math", "03_training_bs1", "03_training_bs2",
                 "04_profiling_bs1", "04_profiling_bs2", "05_summaries", "06_report"]:
        assert (run / f"{stem}.html").stat().st_size > 10_000, stem
        assert (run / f"{stem}.ipynb").exists()
    s = json.loads((run / "summary.json").read_text())
    assert s["run_id"] == "e2e" and s["status"] == "complete"
    assert all(n["status"] == "ok" for n in s["notebooks"]), s["notebooks"]
    # the tiny default: the demo recipe, one dialogue per row (2000 built-in train dialogues)
    assert s["config"]["recipe"]["name"] == "demo" and s["config"]["model"] == "tiny"
    assert s["config"]["packing"] is False and s["data"]["train_chunks"] == 2000
    assert "loralab: default: recipe demo" in r.stdout
    assert [row["batch_size"] for row in s["sweep"]] == [1, 2]
    for row in s["sweep"]:
        assert row["status"] == "ok" and row["final_loss"] > 0 and row["tokens_per_s"] > 0
        assert row["epoch_time_kind"] == "extrapolated from 2 steps"
        assert row["predicted_peak_gib"] > 0 and row["flops_per_step"] > 0 and row["macs_per_step"] > 0
    # FLOPs per step: the analytic count at the rows' mean length (one dialogue per row, not packed)
    from loralab.config import get_recipe
    from loralab.flops import recipe_step_flops
    from loralab.shape import preset_config

    for row in s["sweep"]:
        tr = json.loads((run / f"bs{row['batch_size']}" / "train_result.json").read_text())
        assert tr["tokens_per_step"] < 128 * row["batch_size"]  # real tokens, padding excluded
        assert row["tokens_per_s"] == pytest.approx(tr["tokens_per_step"] / tr["step_time_s"], rel=1e-6)
        seq = max(1, round(tr["tokens_per_step"] / row["batch_size"]))
        expected = recipe_step_flops(preset_config("tiny"), get_recipe("demo"), row["batch_size"], seq).model_flops
        assert row["flops_per_step"] == expected
    assert s["eval"]["n"] == 4 and "rougeL" in s["eval"]["rouge_base"]
    index = (run / "index.html").read_text()
    assert "06_report.html" in index and "03_training_bs2.html" in index
    # the 06 report carries the study's numbers beside ours
    report = (run / "06_report.html").read_text()
    assert "9.31" in report and "1555" in report  # the study's bs-1 memory and steps per epoch
    # packing follows the recipe: seed packs (as the study), demo does not
    assert run_all.config_from_args(["--recipe", "seed"]).packing is True
    # a second run with the same id never overwrites the first
    before = (run / "summary.json").read_text()
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 2 and "never overwrites" in r2.stderr
    assert (run / "summary.json").read_text() == before


@pytest.mark.slow
def test_failed_and_diverged_runs_exit_1_with_a_one_line_summary(tmp_path, monkeypatch, capsys):
    """bs 100000 cannot train on the built-in set: its notebook fails and shows the error; bs 2 with a learning rate
    of 1e12 reaches a NaN loss (its notebook completes and reports it); the sweep goes on, the run "failed", exit 1."""
    from loralab.config import get_recipe

    monkeypatch.setattr(preflight, "check_data", lambda cfg, splits: None)  # it would refuse bs 100000 up front
    out = tmp_path / "outputs"
    argv = ["--batch-sizes", "100000", "2", "--max-steps", "20", "--seq-len", "128", "--notebooks", "03",
            "--out", str(out), "--run-id", "fail"]
    cfg = run_all.config_from_args(argv)
    cfg.recipe = get_recipe("demo").replace(learning_rate=1e12)  # the whole recipe reaches the kernel in `config`
    monkeypatch.setattr(run_all, "config_from_args", lambda argv: cfg)
    assert run_all.main(argv) == 1
    run = out / "fail"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("run_all.py: 2 of 2 notebooks failed: 03_training bs100000 (error: ConfigError: batch_size=100000")
    assert "03_training bs2 (diverged at step 3)" in err and err.strip().endswith(f"report: {run / 'index.html'}")
    s = json.loads((run / "summary.json").read_text())
    failed = [n for n in s["notebooks"] if n["tag"] == "bs100000"][0]
    assert failed["status"] == "error" and "batch_size=100000" in failed["error"]
    assert "batch_size=100000" in (run / "03_training_bs100000.html").read_text()
    assert [r["status"] for r in s["sweep"]] == ["error", "diverged"]
    status = json.loads((run / "run_status.json").read_text())
    assert s["status"] == status["status"] == "failed" and s["failed"] == status["failed"] == 2
    assert "<b>Failed</b>: 2 of 2 notebooks failed" in (run / "index.html").read_text()


def test_auto_batch_needs_a_gpu(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = run_all.main(["--batch-sizes", "auto", "--out", str(tmp_path / "o")])
    assert rc == 2 and "--batch-sizes auto: needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
