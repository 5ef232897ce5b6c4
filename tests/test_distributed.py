"""The distributed path on CPU: torchrun, gloo, 2 processes, the tiny model.

Each launch is a real ``torchrun`` (``loralab.distributed.launch``) with a wall-clock limit,
so a hung collective fails the test instead of blocking CI.
"""

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loralab import distributed as D
from loralab.config import ConfigError, RunConfig, get_recipe
from loralab.data import TokenizedSplit
from loralab.memory import GIB, predict_peak
from loralab.shape import preset_config
from loralab.train import run_training

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 150


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fp32_cfg(batch_size: int, steps: int = 3, packing: bool = True, **recipe) -> RunConfig:
    """fp32 everywhere (the comparison must not hide behind bf16 noise), tiny, 128-token chunks."""
    r = get_recipe("seed").replace(**{"quantization": "none", "prepare_for_kbit": False, "gradient_checkpointing": "none",
                                      "attn_implementation": "sdpa", **recipe})
    return RunConfig(model="tiny", recipe=r, batch_sizes=[batch_size], seq_len=128, max_steps=steps, device="cpu",
                     packing=packing)


def launch(cfg, out, extra=None, env=None, **kw):
    """torchrun on this machine, on a free port, with a wall-clock limit (a hung collective fails the test)."""
    cfg = dataclasses.replace(cfg, master_port=free_port(), **kw)
    return D.launch(cfg, out, progress=lambda *a: None, extra=extra, timeout_s=LAUNCH_TIMEOUT_S,
                    env={"LORALAB_DIST_TIMEOUT_S": "10", **(env or {})})


def steps_of(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory):
    """The reference: one process, batch 4, in this process (loralab.train.run_training, world size 1)."""
    return run_training(fp32_cfg(4), tmp_path_factory.mktemp("one"), progress=lambda *a: None).losses


# --- pure functions --------------------------------------------------------------------------
def test_rank_batches_partition_the_global_batch_in_order():
    split = TokenizedSplit(rows=[[i] * 4 for i in range(20)], n_examples=20, n_tokens=80, lengths=[4] * 20,
                           packed=True, seq_len=4)
    # 2 ranks x batch 2 x 2 accumulation = global batch 8: 2 steps, rows 16..19 dropped
    seen = {}
    for r in range(2):
        seen[r] = [[b["input_ids"][:, 0].tolist() for b in micro] for micro in D.rank_batches(split, 2, 0, r, 2, 2)]
    assert seen[0] == [[[0, 1], [4, 5]], [[8, 9], [12, 13]]]
    assert seen[1] == [[[2, 3], [6, 7]], [[10, 11], [14, 15]]]
    assert D.steps_per_epoch(20, 2, 2, 2) == 2 and D.global_batch_size(2, 2, 2) == 8


def test_predicted_per_gpu_peak_ddp_and_fsdp():
    cfg7 = preset_config("llama2-7b")
    fast = get_recipe("fast")
    one = predict_peak(cfg7, fast, 1, 2048)
    ddp = D.predict_peak_distributed(cfg7, fast, 1, 2048, 2, "ddp")
    # DDP: the one-GPU step plus a bucket copy of the LoRA grads (4,194,304 x 4 B = 16 MiB)
    assert ddp.terms["ddp_gradient_buckets"] == 4 * 4_194_304
    assert 0 < ddp.total - one.total < 0.02 * GIB
    fsdp = D.predict_peak_distributed(cfg7, fast, 1, 2048, 2, "fsdp")
    # FSDP: the 12.55 GiB of bf16 weights become 6.28 GiB per GPU, plus the gathered root and 2 layers
    assert fsdp.terms["weights_linear"] == pytest.approx(one.terms["weights_linear"] / 2, abs=1)
    assert fsdp.terms["activations_held"] == one.terms["activations_held"]
    # FSDP2 gathers into full-size buffers beside the local shards (see predict_peak_distributed):
    # 2 layers in flight = 2 x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096 norm) x 2 B;
    # the root (embeddings + LM head + final norm) = (2 x 32000 x 4096 + 4096) x 2 B, kept whole
    assert fsdp.terms["fsdp_layers_in_flight"] == 2 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) * 2
    assert fsdp.terms["fsdp_root_unsharded"] == (2 * 32000 * 4096 + 4096) * 2
    saved = one.total - fsdp.total
    assert 5.0 * GIB < saved < 5.2 * GIB
    assert D.predict_peak_distributed(cfg7, fast, 1, 2048, 1, "fsdp").total == one.total


def test_strategy_choice_by_the_memory_model():
    fast_ckpt = get_recipe("fast").replace(gradient_checkpointing="full")
    cfg13 = preset_config("llama2-13b")
    # 13B in bf16 is 24.2 GiB of weights: no replica fits 24 GiB, shards do
    assert D.choose_strategy(cfg13, fast_ckpt, 1, 2048, 2, 24.0) == "fsdp"
    assert D.predict_peak_distributed(cfg13, fast_ckpt, 1, 2048, 2, "fsdp").reserved < 24 * GIB
    assert D.choose_strategy(preset_config("llama2-7b"), get_recipe("fast"), 1, 2048, 2, 80.0) == "ddp"


def test_bad_launch_arguments_are_config_errors():
    for kw in ({"nproc": 0}, {"strategy": "zero3"}, {"grad_accum": 0}, {"nnodes": 2, "node_rank": 2}):
        with pytest.raises(ConfigError):
            RunConfig(**kw)


# --- torchrun, gloo, 2 processes ---------------------------------------------------------------
@pytest.mark.slow  # torchrun: real processes
def test_ddp_two_ranks_match_one_process(tmp_path, one_process_losses):
    """(a) 2 processes x batch 2 == 1 process x batch 4, step for step, within 1 %."""
    res = launch(fp32_cfg(2), tmp_path, nproc=2, strategy="ddp")
    assert res.status == "ok", res
    torch.testing.assert_close(res.losses, one_process_losses, rtol=0.01, atol=0)
    assert (res.world_size, res.batch_size, res.grad_accum, res.global_batch_size) == (2, 2, 1, 4)
    lines = steps_of(tmp_path)
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert lines[0]["tokens"] == 4 * 128 and len(lines[0]["ranks"]) == 2
    assert lines[0]["tokens_per_s_per_gpu"] == pytest.approx(lines[0]["tokens_per_s"] / 2)
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow  # torchrun: real processes
@pytest.mark.parametrize("packing", [True, False])
def test_one_loop_one_process_and_two_agree_on_loss_and_tokens(tmp_path, packing):
    """The same loop (loralab.train.train: run in this process, and on both torchrun ranks through
    train_entry -> train_on_rank) gives, per step, the same loss and the same trained tokens for 1 process x
    batch 4 and 2 processes x batch 2. Unpacked rows have different lengths: each micro-batch's loss is weighted
    by its target tokens, so the two agree to fp32 rounding, not just on average."""
    one = run_training(fp32_cfg(4, packing=packing), tmp_path / "one", progress=lambda *a: None)
    two = launch(fp32_cfg(2, packing=packing), tmp_path / "two", nproc=2, strategy="ddp")
    assert one.status == two.status == "ok"
    torch.testing.assert_close(two.losses, one.losses, rtol=1e-4, atol=0)
    one_steps, two_steps = steps_of(tmp_path / "one"), steps_of(tmp_path / "two")
    assert [s["tokens"] for s in two_steps] == [s["tokens"] for s in one_steps]
    if packing:
        assert {s["tokens"] for s in one_steps} == {4 * 128}
    else:
        assert len({s["tokens"] for s in one_steps}) > 1  # real, differing row lengths
    assert set(one_steps[0]) <= set(two_steps[0])  # one writer of steps.jsonl: the two-process lines add per-rank detail


def test_one_step_one_backward():
    """Every path that trains or measures calls loralab.train.forward_backward: it is the only .backward() in the
    library, and torchrun's entry point runs the same train_on_rank as one process."""
    import re

    from loralab import train, train_entry

    lib = Path(__file__).resolve().parents[1] / "lib" / "loralab"
    calls = {f.name: len(re.findall(r"\)\.backward\(", f.read_text())) for f in lib.glob("*.py")}
    assert {k: v for k, v in calls.items() if v} == {"train.py": 1}
    assert "def forward_backward" in (lib / "train.py").read_text()
    assert train_entry.train_on_rank is train.train_on_rank


@pytest.mark.slow  # torchrun: real processes
def test_fsdp_two_ranks_match_one_process_and_save_the_whole_adapter(tmp_path, one_process_losses):
    """(b) FSDP2 fully_shard runs on CPU with gloo in torch 2.13: same losses, a complete adapter.
    With checkpointing (the 13B-on-two-GPUs case): FSDP switches it to non-reentrant; the math is unchanged."""
    res = launch(fp32_cfg(2, gradient_checkpointing="full"), tmp_path, nproc=2, strategy="fsdp")
    assert res.status == "ok", res
    torch.testing.assert_close(res.losses, one_process_losses, rtol=0.01, atol=0)
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    a = next(v for k, v in sd.items() if "lora_A" in k)
    assert a.shape == (8, 128)  # the full (r x hidden) matrix, not a shard


@pytest.mark.slow  # torchrun: real processes
def test_gradient_accumulation_equals_a_larger_batch(tmp_path, one_process_losses):
    """2 ranks x batch 1 x 2 accumulation steps == 1 process x batch 4."""
    res = launch(fp32_cfg(1), tmp_path, nproc=2, strategy="ddp", grad_accum=2)
    assert res.status == "ok", res
    torch.testing.assert_close(res.losses, one_process_losses, rtol=0.01, atol=0)


@pytest.mark.slow  # torchrun: real processes
def test_oom_on_every_rank_stops_all_cleanly(tmp_path):
    """(c) the agreement path: every rank sees the OOM flag, stops together and exits 0."""
    res = launch(fp32_cfg(2, steps=4), tmp_path, nproc=2, strategy="ddp",
                 extra=["--inject-oom-ranks", "0,1", "--inject-oom-step", "2"])
    assert res.status == "oom"
    assert res.rank_status == ["oom", "oom"] and res.steps_done == 1
    assert len(steps_of(tmp_path)) == 1


@pytest.mark.slow  # torchrun: real processes
def test_oom_on_one_rank_ends_the_run_without_a_hang(tmp_path):
    """(c) rank 1 alone runs out of memory while rank 0 waits in DDP's all-reduce: rank 1 records it,
    its control exchange times out (10 s here), it exits, torchrun stops rank 0; the result is "oom"."""
    res = launch(fp32_cfg(2, steps=4), tmp_path, nproc=2, strategy="ddp",
                 extra=["--inject-oom-ranks", "1", "--inject-oom-step", "2"])
    assert res.status == "oom", res
    assert res.oom_memory["at_step"] == 2 and res.oom_memory["ranks"] == [1]
    assert res.rank_status[1] == "oom"
    assert json.loads((tmp_path / "train_result.json").read_text())["status"] == "oom"
    assert "killed after" not in (tmp_path / "torchrun.log").read_text()  # ended on its own, not by our limit


@pytest.mark.slow
def test_run_all_nproc_2_end_to_end(tmp_path):
    """(d) run_all --nproc 2 on CPU: notebooks 03 and 06 with two processes per training run, and the
    scaling section of 06 against a one-process reference run of the same job."""
    common = [sys.executable, str(REPO / "run_all.py"), "--device", "cpu", "--batch-sizes", "2", "--recipe", "fast",
              "--seq-len", "128", "--max-steps", "3", "--out", str(tmp_path)]
    p = subprocess.run(common + ["--notebooks", "03", "06", "--run-id", "one"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    cmd = common + ["--nproc", "2", "--notebooks", "00", "01", "03", "06", "--run-id", "dist",
                    "--master-port", str(free_port()), "--scaling-reference", str(tmp_path / "one")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    run = tmp_path / "dist"
    tr = json.loads((run / "bs2" / "train_result.json").read_text())
    assert tr["status"] == "ok" and tr["world_size"] == 2 and tr["global_batch_size"] == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sweep"][0]["status"] == "ok"
    assert (run / "03_training_bs2.html").exists()
    ref = json.loads((tmp_path / "one" / "summary.json").read_text())
    (row,) = summary["scaling"]["rows"]
    assert (row["GPUs (reference)"], row["GPUs (this run)"], row["batch size per GPU"]) == (1, 2, 2)
    assert row["speed-up"] == pytest.approx(summary["sweep"][0]["tokens_per_s"] / ref["sweep"][0]["tokens_per_s"])
    assert row["efficiency"] == pytest.approx(row["speed-up"] / 2)
    assert "Throughput: this run vs the reference" in (run / "06_report.html").read_text()
    index = (run / "index.html").read_text()
    assert "batch per GPU x GPUs x accumulation = global" in index and "<td>2 x 2 x 1 = 4</td>" in index
    assert "accumulation = global" not in (tmp_path / "one" / "index.html").read_text()  # one process: no GPU columns


@pytest.mark.slow  # torchrun: real processes
def test_scaling_reference_of_another_job_is_refused(tmp_path):
    """A reference of another recipe: one-line error, exit 2, no run folder."""
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "summary.json").write_text(json.dumps({"config": {"model": "tiny", "recipe": {"name": "seed"}, "seq_len": 128}}))
    out = tmp_path / "runs"
    p = subprocess.run([sys.executable, str(REPO / "run_all.py"), "--device", "cpu", "--batch-sizes", "2", "--recipe", "fast",
                        "--seq-len", "128", "--out", str(out), "--scaling-reference", str(ref)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "--scaling-reference" in p.stderr and "same model, recipe" in p.stderr
    assert not out.exists() or not any(out.iterdir())
    p = subprocess.run([sys.executable, str(REPO / "run_all.py"), "--device", "cpu", "--batch-sizes", "2",
                        "--out", str(out), "--scaling-reference", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "expected an earlier run folder with a summary.json" in p.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_random_shape_built_on_meta_trains_one_step(strategy, monkeypatch):
    """The in-memory random-weight path (llama2-13b on GPUs: built on meta, sharded, then materialised) on the
    tiny shape, one process in a process group."""
    from loralab.model import build_random_model
    from loralab.train import forward_backward

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = dataclasses.replace(fp32_cfg(2), strategy=strategy)
    ctx = D.init(cfg)
    try:
        ctx.strategy, ctx.world_size = strategy, 2  # as a rank of two would shard (FSDP over a mesh of 1 here)
        shard = (lambda m: D.wrap_model(m, dataclasses.replace(ctx, world_size=1), cfg.recipe)) if strategy == "fsdp" else None
        model = build_random_model(preset_config("tiny"), cfg.recipe, ctx.device, seed=0, shard=shard)
        if shard is None:
            model = D.wrap_model(model, dataclasses.replace(ctx, world_size=1), cfg.recipe)
        batch = {"input_ids": torch.randint(4, 2000, (2, 32))}
        batch["labels"] = batch["input_ids"].clone()
        loss = forward_backward(model, batch)
        assert 7.0 < float(loss) < 8.5  # ~ln(2048) = 7.6 for random weights
        grads = [p.grad for n, p in D.unwrap(model).named_parameters() if "lora_A" in n]
        assert grads and all(g is not None for g in grads)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * 8 * (128 + 128)
    finally:
        D.teardown(ctx)


def test_per_gpu_prediction_against_the_committed_two_h200_runs():
    """The memory model against benchmarks/results/distributed_*_H200x2_20261130 (measured, not fitted):
    the 13B shape under FSDP on 2 GPUs (the bar: 5 %) and the 7B DDP runs at batch 2 per GPU."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    runs = {}
    for name in ("distributed_ACD_H200x2_20261130-0939.json", "distributed_EFG_H200x2_20261130-0945.json"):
        runs.update(json.loads((results / name).read_text())["runs"])
    fast = get_recipe("fast").replace(allocator="caching")  # those runs predate expandable segments in `fast`
    f = runs["F"]
    assert (f["status"], f["world_size"], f["strategy"], f["per_gpu_batch_size"]) == ("ok", 2, "fsdp", 1)
    pred = D.predict_peak_distributed(preset_config("llama2-13b"), fast.replace(gradient_checkpointing="full"), 1, 2048, 2, "fsdp")
    assert pred.reserved / GIB == pytest.approx(f["peak_reserved_gib"], rel=0.05)  # 15.96 vs 16.58
    assert runs["E"]["status"] == "oom"  # the same model on one GPU under the same 24 GiB cap
    for name in ("A", "D", "G"):
        r = runs[name]
        pred = D.predict_peak_distributed(preset_config("llama2-7b"), fast, 2, 2048, r["world_size"], "ddp")
        assert pred.reserved / GIB == pytest.approx(r["peak_reserved_gib"], rel=0.05), name


@pytest.mark.xfail(strict=True, reason="since the memory model counts fast's chunked cross-entropy (not HF's 12V logits per "
                   "token), the 13B FSDP + checkpointing run's allocated peak is predicted 2.7 % low (15.19 vs 15.61 GiB); "
                   "its reserved peak stays within 5 %. The 2 % agreement before came from counting a loss that run did not "
                   "compute. To be re-measured on two GPUs.")
def test_per_gpu_allocated_of_the_13b_fsdp_run_within_2_percent():
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    f = json.loads((results / "distributed_EFG_H200x2_20261130-0945.json").read_text())["runs"]["F"]
    fast = get_recipe("fast").replace(allocator="caching", gradient_checkpointing="full")
    pred = D.predict_peak_distributed(preset_config("llama2-13b"), fast, 1, 2048, 2, "fsdp")
    assert pred.allocated / GIB == pytest.approx(f["peak_allocated_gib"], rel=0.02)
