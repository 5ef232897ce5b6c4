"""Long runs users can trust: run_all.py under signals, kills, full disks and bad folders.

Each case ends with one line on stderr (no traceback), the right exit code (2: bad input, no folder made; 1: the
run failed; 130 / 143: interrupted), a status that says what happened, no process left behind and no file that
looks complete but is not. The interrupted runs are real ``python run_all.py`` processes on the tiny model.
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import psutil
import pytest

import run_all
from loralab import checkpoint, lifecycle, preflight, sweep
from loralab.model import materialize_preset
from loralab.results import TrainResult
from test_resume import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--batch-sizes", "2", "--seq-len", "128", "--device", "cpu"]


# --- helpers --------------------------------------------------------------------------------------
def start(tmp_path: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "out"
    cmd = [sys.executable, "run_all.py", *args, "--out", str(out), "--run-id", name]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=(tmp_path / f"{name}.out").open("w"),
                            stderr=(tmp_path / f"{name}.err").open("w"))
    return proc, out / name


def wait_for_steps(proc: subprocess.Popen, bs_dir: Path, n: int, checkpointed: bool = False, timeout_s: float = 300):
    """Until steps.jsonl has ``n`` lines (and a checkpoint exists, when asked)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        f = bs_dir / "steps.jsonl"
        if f.exists() and len(f.read_text().splitlines()) >= n and (not checkpointed or checkpoint.latest(bs_dir)):
            return
        assert proc.poll() is None, f"the run ended before it could be stopped (exit {proc.returncode})"
        time.sleep(0.1)
    raise AssertionError("training did not start in time")


def mentions(run: Path) -> list[psutil.Process]:
    """Processes whose command line or environment names the run folder (kernels: LORALAB_PROGRESS_FILE)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid != os.getpid() and (str(run) in " ".join(p.info["cmdline"] or [])
                                         or str(run) in p.environ().get("LORALAB_PROGRESS_FILE", "")):
                found.append(p)
        except psutil.Error:
            pass
    return found


def assert_nothing_left(tree: list[psutil.Process], run: Path, timeout_s: float = 40) -> None:
    _, alive = psutil.wait_procs(tree, timeout=timeout_s)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert not mentions(run)


def one_line(text: str) -> str:
    assert text.count("\n") <= 1 and text.strip() and "Traceback" not in text, text
    assert text.startswith("run_all.py: ")
    return text.strip()


def read(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


def steps(bs_dir: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (bs_dir / "steps.jsonl").read_text().splitlines()]


def resume(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_all.py", "--resume", str(run)], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


# --- bad input: one line, exit 2, no folder -------------------------------------------------------
@pytest.fixture
def read_only_mount(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    made = subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0
    if made and subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode == 0:
        yield ro
    else:
        if made:
            subprocess.run(["umount", str(ro)])
        pytest.skip("cannot make a read-only bind mount here (needs root with CAP_SYS_ADMIN)")
    subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only folder", "read-only mount"])
def test_bad_out_is_one_line_exit_2_and_no_folder(tmp_path, capsys, request, case):
    f = tmp_path / "file"
    f.write_text("x")
    if case == "a file":
        out, expected = f, "is a file"
    elif case == "under a file":
        out, expected = f / "sub" / "outputs", "is a file, so no folder can be made under it"
    elif case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes through permission bits (the read-only mount case checks the probe write)")
        out = tmp_path / "locked"
        out.mkdir(mode=0o500)
        expected = "cannot write in"
    else:
        out, expected = request.getfixturevalue("read_only_mount") / "outputs", "Read-only file system"
    before = sorted(tmp_path.rglob("*"))
    rc = run_all.main(["--notebooks", "00", "--out", str(out)])
    err = one_line(capsys.readouterr().err)
    assert rc == 2 and expected in err and str(out) in err
    assert sorted(tmp_path.rglob("*")) == before  # no folder made


def test_too_little_disk_space_is_exit_2_before_a_folder(tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    real = shutil.disk_usage
    out = tmp_path / "outputs"
    # the output disk
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(2**40, 2**40 - 2**20, 2**20))
    assert run_all.main(["--notebooks", "00", "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "0.00 GiB free on its disk; a run needs at least 1 GiB" in err and not out.exists()
    # the model cache, when a preset must be built there first (the output folder's disk has room)
    home = tmp_path / "home"
    monkeypatch.setenv("LORALAB_HOME", str(home))
    out.mkdir()
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(2**40, 2**40, 2**20) if Path(p) == tmp_path
                        else real(p))  # tmp_path: the nearest existing folder of the cache
    assert run_all.main(["--notebooks", "00", "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"model cache '{home / 'models'}'" in err and "writing model 'tiny' there needs" in err
    assert not any(out.iterdir()) and not home.exists()


def test_truncated_weights_in_a_model_folder_are_refused_up_front(tmp_path, capsys):
    hf = tmp_path / "hf-model"
    shutil.copytree(materialize_preset("tiny", progress=lambda *a: None), hf)
    (hf / "loralab_preset.json").unlink()  # a user's folder, not a preset
    weights = hf / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    out = tmp_path / "outputs"
    assert run_all.main(["--model", str(hf), "--notebooks", "00", "--out", str(out)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"model '{hf}': model.safetensors:" in err and "truncated or corrupt" in err and not out.exists()


def fake_run(run: Path, status: dict) -> Path:
    run.mkdir(parents=True)
    (run / "run_config.json").write_text(json.dumps({"model": "tiny", "notebooks": ["00"]}))
    (run / "run_status.json").write_text(json.dumps(status))
    return run


def test_resume_refuses_what_it_cannot_resume(tmp_path, capsys):
    me = psutil.Process()
    alive = {"status": "running", "pid": me.pid, "pid_started": me.create_time(), "host": socket.gethostname(),
             "heartbeat": time.time()}
    cases = [
        ([str(tmp_path / "nothing")], "no such folder"),
        ([str(tmp_path)], "not a run folder"),
        ([str(fake_run(tmp_path / "live", alive))], f"the run is still running (its runner (pid {me.pid}) is still running"),
        ([str(fake_run(tmp_path / "done", {**alive, "status": "complete"}))], "the run is complete; nothing to resume"),
        ([str(tmp_path / "done"), "--max-steps", "3"], "--resume takes no other option"),
    ]
    for args, expected in cases:
        assert run_all.main(["--resume", *args]) == 2, args
        err = one_line(capsys.readouterr().err)
        assert expected in err, err


def test_a_dead_runner_is_told_from_a_live_one():
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert lifecycle.still_alive({"status": "running", "pid": dead.pid, "host": host}) is None
    assert lifecycle.still_alive({"status": "running", "pid": os.getpid(), "host": host})
    me = psutil.Process()  # a pid reused by another process: its start time differs
    assert lifecycle.still_alive({"status": "running", "pid": me.pid, "pid_started": me.create_time() - 100,
                                  "host": host}) is None
    other = {"status": "running", "pid": 1, "host": host + "-elsewhere"}
    assert lifecycle.still_alive({**other, "heartbeat": time.time() - 5})
    assert lifecycle.still_alive({**other, "heartbeat": time.time() - 3600}) is None
    assert lifecycle.still_alive({**other, "status": "interrupted", "heartbeat": time.time()}) is None


def test_the_status_file_carries_pid_host_and_a_live_heartbeat(tmp_path):
    st = lifecycle.StatusFile(tmp_path / "run_status.json", status="running")
    st.update()
    first = read(tmp_path, "run_status.json")
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname() and first["status"] == "running"
    st.start_heartbeat(interval_s=0.05)
    time.sleep(0.3)
    st.stop_heartbeat()
    assert read(tmp_path, "run_status.json")["heartbeat"] > first["heartbeat"]
    assert lifecycle.still_alive(first)  # this process wrote it and is running
    assert not list(tmp_path.glob("*.tmp"))


# --- a full disk during a run: one line, exit 1, nothing half-written -------------------------------
def left_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir())


def test_disk_full_while_a_notebook_is_written(tmp_path, capsys, monkeypatch):
    import papermill.engines

    def full(nb, path):  # papermill writes the executed notebook as it runs: half of it, then the disk is full
        Path(path).write_text('{"cells": [')
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(papermill.engines, "write_ipynb", full)
    out = tmp_path / "outputs"
    rc = run_all.main(["--notebooks", "00", "06", "--out", str(out), "--run-id", "full"])
    err = one_line(capsys.readouterr().err)
    run = out / "full"
    assert rc == 1 and "no space left on the disk" in err and "stopped at 00_setup" in err and f"--resume {run}" in err
    files = left_files(run)
    assert not [f for f in files if f.endswith((".ipynb", ".tmp")) or (f.endswith(".html") and f != "index.html")], files
    assert read(run, "run_status.json")["status"] == "failed" and read(run, "summary.json")["not_run"] == ["06_report"]
    assert "No space left on device" in (run / "index.html").read_text()


def test_disk_full_while_the_summary_is_written(tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def write_text(self, data, *a, **kw):
        if self.name == "summary.json.tmp":
            real(self, data[: len(data) // 2], *a, **kw)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *a, **kw)

    def execute(nb, run_dir, params, tag="", should_stop=None):  # no kernel: the runner's own writes are tested
        return {"notebook": "00_setup", "tag": "", "label": "00_setup", "status": "ok", "error": None,
                "elapsed_s": 0.1, "html": None}

    monkeypatch.setattr(sweep, "execute", execute)
    monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "outputs"
    rc = run_all.main(["--notebooks", "00", "--out", str(out), "--run-id", "full"])
    err = one_line(capsys.readouterr().err)
    run = out / "full"
    assert rc == 1 and "cannot write the reports" in err and "No space left on device" in err
    assert "summary.json" not in left_files(run) and not [f for f in left_files(run) if f.endswith(".tmp")]
    assert read(run, "run_status.json")["status"] == "failed"


def test_a_run_folder_turned_read_only_keeps_its_status_true(tmp_path, capsys, monkeypatch):
    """chmod 555 on the run folder after 00_setup, as a user might: tests run as root (chmod does not stop root),
    so every new file in the folder fails with EACCES here, as it would for its owner. The status file itself is
    still writable: it must say "failed", the advice must name permissions (not free space), and no report that
    could not be written is offered."""
    import loralab.files
    import loralab.run_folder

    real = loralab.files.write_text_atomic
    locked = {"on": False}

    def write_text_atomic(path, text):
        if locked["on"] and Path(path).parent == out / "ro":
            raise PermissionError(errno.EACCES, "Permission denied", str(Path(path).with_name(Path(path).name + ".tmp")))
        return real(path, text)

    def execute(nb, run, params, tag="", should_stop=None):  # no kernel: the runner's own writes are tested
        locked["on"] = True  # 00_setup ran, then the folder turned read-only
        return {"notebook": "00_setup", "tag": "", "label": "00_setup", "status": "ok", "error": None,
                "elapsed_s": 0.1, "html": None}

    monkeypatch.setattr(loralab.files, "write_text_atomic", write_text_atomic)
    monkeypatch.setattr(loralab.run_folder, "write_text_atomic", write_text_atomic)
    monkeypatch.setattr(sweep, "execute", execute)
    out = tmp_path / "outputs"
    rc = run_all.main(["--notebooks", "00", "--out", str(out), "--run-id", "ro"])
    err = one_line(capsys.readouterr().err)
    run = out / "ro"
    assert rc == 1
    assert "Permission denied" in err and "writable" in err and "free space" not in err, err
    assert "index.html" not in err and not (run / "index.html").exists()
    status = read(run, "run_status.json")
    assert status["status"] == "failed" and "Permission denied" in status["stopped_because"]


# --- signals: stop within seconds, say so everywhere, leave nothing, resume -------------------------
@pytest.mark.slow
def test_sigint_stops_within_seconds_and_resume_finishes_the_run(tmp_path, capsys):
    proc, run = start(tmp_path, "int", ["--notebooks", "00", "03", "06", *TRAIN, "--max-steps", "200"])
    wait_for_steps(proc, run / "bs2", 3)
    assert run_all.main(["--resume", str(run)]) == 2  # a live run is not resumed under its feet
    assert "the run is still running" in one_line(capsys.readouterr().err)
    tree = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130 and time.monotonic() - t0 < 40
    err = one_line((tmp_path / "int.err").read_text())
    assert "interrupted (SIGINT) in 03_training bs2" in err and err.endswith(f"python run_all.py --resume {run}")
    assert_nothing_left(tree, run)
    status, summary = read(run, "run_status.json"), read(run, "summary.json")
    assert status["status"] == summary["status"] == "interrupted" and summary["not_run"] == ["06_report"]
    assert [r["status"] for r in status["notebooks"]] == ["ok", "interrupted"]
    index = (run / "index.html").read_text()
    assert "Interrupted</b> (SIGINT)" in index and "06_report" in index and 'href="06_report.html"' not in index
    assert 'href="03_training_bs2.html"' in index and (run / "03_training_bs2.html").exists()
    tr = TrainResult.load(run / "bs2")  # the kernel got SIGINT: the loop checkpointed after its step
    assert tr.status == "interrupted" and checkpoint.latest(run / "bs2").name == f"step-{tr.steps_done:06d}"
    console = (tmp_path / "int.out").read_text()
    assert "\n      training bs 2: step 0/200" in console and "\r" not in console  # progress under the notebook

    r = resume(run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "00_setup                     ok (kept from the earlier attempt)" in r.stdout and not r.stderr.strip()
    assert steps(run / "bs2") == list(range(1, 201))  # every step once: the resumed steps continue the log
    assert f"resuming from {run / 'bs2' / 'checkpoints'}" in (run / "03_training_bs2.html").read_text()
    status = read(run, "run_status.json")
    assert status["status"] == read(run, "summary.json")["status"] == "complete" and len(status["resumed"]) == 1
    assert 'href="06_report.html"' in (run / "index.html").read_text()


@pytest.mark.slow
def test_sigterm_to_the_runner_alone_stops_the_ranks_with_a_checkpoint(tmp_path):
    """SIGTERM (Slurm, Kubernetes, timeout) reaches the runner only: it interrupts the kernel (as for SIGINT, tested
    above with one process); under torchrun launch() passes SIGTERM to the ranks, which checkpoint after their step."""
    ranks = ["--nproc", "2", "--master-port", str(free_port())]
    proc, run = start(tmp_path, "term", ["--notebooks", "03", *TRAIN, "--max-steps", "300", *ranks])
    wait_for_steps(proc, run / "bs2", 3)
    tree = psutil.Process(proc.pid).children(recursive=True)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143 and time.monotonic() - t0 < 40
    err = one_line((tmp_path / "term.err").read_text())
    assert "interrupted (SIGTERM)" in err and f"--resume {run}" in err
    assert_nothing_left(tree, run)
    assert read(run, "run_status.json")["status"] == read(run, "summary.json")["status"] == "interrupted"
    tr = TrainResult.load(run / "bs2")
    assert tr.status == "interrupted" and checkpoint.latest(run / "bs2").name == f"step-{tr.steps_done:06d}"
    assert "interrupted" in (run / "index.html").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_of_the_runner_leaves_no_process_and_resume_accepts_the_dead_run(tmp_path, nproc):
    ranks = ["--nproc", "2", "--master-port", str(free_port())] if nproc == 2 else []
    proc, run = start(tmp_path, "kill", ["--notebooks", "03", *TRAIN, "--max-steps", "40",
                                         "--checkpoint-every-min", "0.01", *ranks])
    wait_for_steps(proc, run / "bs2", 3, checkpointed=True)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= (4 if nproc == 2 else 1)  # kernel (+ torchrun and its two workers)
    proc.kill()
    proc.wait()
    assert_nothing_left(tree, run)  # PR_SET_PDEATHSIG: kernel, torchrun and workers die with the runner
    status = read(run, "run_status.json")
    assert status["status"] == "running" and status["pid"] == proc.pid and status["host"] == socket.gethostname()
    assert status["heartbeat"] > time.time() - 600 and lifecycle.still_alive(status) is None
    r = resume(run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert steps(run / "bs2") == list(range(1, 41))
    assert read(run, "run_status.json")["status"] == "complete"


@pytest.mark.slow
def test_a_kernel_killed_mid_training_fails_the_run(tmp_path):
    proc, run = start(tmp_path, "dead", ["--notebooks", "03", *TRAIN, "--max-steps", "300"])
    wait_for_steps(proc, run / "bs2", 3)
    kernel = [p for p in psutil.Process(proc.pid).children() if "ipykernel" in " ".join(p.cmdline())]
    assert len(kernel) == 1
    kernel[0].kill()
    assert proc.wait(timeout=120) == 1
    err = one_line((tmp_path / "dead.err").read_text())
    assert err.startswith("run_all.py: 1 of 1 notebooks failed: 03_training bs2 (error: DeadKernelError: Kernel died)")
    assert read(run, "run_status.json")["status"] == read(run, "summary.json")["status"] == "failed"
    assert not [f for f in left_files(run) if f.endswith(".ipynb")]  # no notebook that stops short without saying why


# --- concurrency ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_sweeps_started_in_the_same_second_both_run(tmp_path):
    out = tmp_path / "outputs"
    cmd = [sys.executable, "run_all.py", "--notebooks", "00", "--out", str(out)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in results]
    runs = sorted(out.iterdir())
    assert len(runs) == 2  # two folders, even when their time stamps are the same
    assert all(read(r, "run_status.json")["status"] == "complete" for r in runs)
