"""Checkpoints and resume inside the one training loop: kill -9 mid-training, resume, same losses, same adapter.

The reference is an uninterrupted run of the same job. The interrupted run is a real separate process (one
process, or torchrun with two gloo ranks) killed with SIGKILL once a checkpoint exists after a few steps; the
resumed run continues from its newest checkpoint in the same folder.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from loralab import checkpoint
from loralab import distributed as D
from loralab.config import RunConfig
from loralab.results import TrainResult
from loralab.train import run_training

STEPS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(**kw) -> RunConfig:
    """The demo recipe (LoRA dropout 0.05: the RNG state matters) on the tiny model, unpacked rows; a checkpoint
    after every step (0.0001 min) so the kill lands between checkpoints at any step."""
    return RunConfig(model="tiny", recipe="demo", batch_sizes=[2], seq_len=128, max_steps=STEPS, device="cpu",
                     checkpoint_every_min=0.0001, **kw)


def steps_of(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines()]


def kill_tree_when_checkpointed(proc: subprocess.Popen, out: Path, after_step: int, timeout_s: float = 300) -> int:
    """SIGKILL the process and all its descendants once a checkpoint past ``after_step`` exists; its step."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        ck = checkpoint.latest(out)
        if ck is not None and int(ck.name.split("-")[1]) >= after_step:
            tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            for pid in tree:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
            return int(ck.name.split("-")[1])
        assert proc.poll() is None, f"the run ended before it could be killed (exit {proc.returncode})"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def start(cfg: RunConfig, out: Path, launch: bool) -> subprocess.Popen:
    cfg_file = out.parent / f"{out.name}.json"
    cfg.save(cfg_file)
    call = ("from loralab import distributed as D; D.launch(cfg, out, timeout_s=600)" if launch
            else "from loralab.train import run_training; run_training(cfg, out)")
    code = textwrap.dedent(f"""
        from pathlib import Path
        from loralab.config import RunConfig
        cfg, out = RunConfig.load(Path({str(cfg_file)!r})), Path({str(out)!r})
        {call}
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def assert_same_run(resumed: TrainResult, reference: TrainResult, out: Path, ref_out: Path) -> None:
    assert resumed.status == reference.status == "ok" and resumed.steps_done == STEPS
    torch.testing.assert_close(resumed.losses, reference.losses, rtol=0, atol=1e-6)
    assert [s["loss"] for s in steps_of(out)] == pytest.approx(reference.losses, abs=1e-6)  # one line per step, no repeats
    assert [s["step"] for s in steps_of(out)] == list(range(1, STEPS + 1))
    got, want = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, ref_out))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    assert len(list((out / "checkpoints").glob("step-*"))) <= checkpoint.KEEP


@pytest.mark.slow
def test_kill_9_and_resume_one_process(tmp_path):
    reference = run_training(job(), tmp_path / "ref", progress=lambda *a: None)
    out = tmp_path / "run"
    killed_at = kill_tree_when_checkpointed(start(job(), out, launch=False), out, after_step=8)
    assert 8 <= killed_at < STEPS and TrainResult.load(out) is None  # nothing that looks finished
    resumed = run_training(dataclasses.replace(job(), resume=True), out, progress=lambda *a: None)
    assert_same_run(resumed, reference, out, tmp_path / "ref")


@pytest.mark.slow
def test_kill_9_and_resume_two_gloo_processes(tmp_path):
    two = dict(nproc=2, strategy="ddp")
    reference = D.launch(dataclasses.replace(job(**two), master_port=free_port()), tmp_path / "ref",
                         progress=lambda *a: None, timeout_s=600)
    out = tmp_path / "run"
    killed_at = kill_tree_when_checkpointed(start(dataclasses.replace(job(**two), master_port=free_port()), out,
                                                  launch=True), out, after_step=6)
    assert 6 <= killed_at < STEPS and TrainResult.load(out) is None
    resumed = D.launch(dataclasses.replace(job(**two), master_port=free_port(), resume=True), out,
                       progress=lambda *a: None, timeout_s=600)
    assert_same_run(resumed, reference, out, tmp_path / "ref")


def test_checkpoints_are_atomic_and_two_are_kept(tmp_path):
    """A partial checkpoint (killed while writing) is never taken for a checkpoint; the two newest stay."""
    cfg = job(max_steps=5) if False else dataclasses.replace(job(), max_steps=5)
    run_training(cfg, tmp_path, progress=lambda *a: None)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == ["step-000004", "step-000005"]
    (tmp_path / "checkpoints" / ".step-000006.partial").mkdir()
    assert checkpoint.latest(tmp_path).name == "step-000005"
