"""A run's life as processes: children that die with their parent, a process tree ended in order, and the
status file whose pid, host and heartbeat tell a live run from a dead one.

* ``die_with_parent(sig)`` / ``preexec_die_with_parent(sig)``: Linux ``prctl(PR_SET_PDEATHSIG)`` (through
  ctypes), so a child gets ``sig`` when its parent ends, even by SIGKILL. The parent is checked right after
  the call: one that ended before it counts as ended. ``run_all.py`` sets ``LORALAB_RUNNER_PID`` for its
  kernels; importing loralab in a process whose parent is that runner arms SIGKILL (``arm_from_env``).
  ``distributed.launch`` arms torchrun with SIGTERM (its agent then stops its workers, which checkpoint), and
  every torchrun worker arms SIGTERM against its agent (``loralab.train_entry``).
* ``end_tree(procs, grace_s)``: SIGTERM (or a chosen signal), up to ``grace_s`` to exit, then SIGKILL.
* ``StatusFile``: ``run_status.json`` rewritten atomically with the runner's pid, its start time, the host
  and a heartbeat refreshed by a daemon thread every ``HEARTBEAT_S``; ``still_alive(status)`` says whether
  the process that wrote it can still be running.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from loralab.files import rewrite_in_place, write_json_atomic

PR_SET_PDEATHSIG = 1
RUNNER_ENV = "LORALAB_RUNNER_PID"
HEARTBEAT_S = 10.0
"""How often a running sweep refreshes the heartbeat in run_status.json."""
STALE_S = 60.0
"""A heartbeat older than this (on another host, where the pid cannot be checked) means the run is dead."""

_PPID = os.getppid()  # the parent at import: loralab's __init__ imports this module first thing
_libc = None


def _prctl():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.prctl


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent (``parent``, default: the parent at import)
    ends; if it has ended already, send ``sig`` now. False where prctl is unavailable (not Linux)."""
    try:
        if _prctl()(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != (parent or _PPID):  # the parent ended before prctl: the signal would never come
        os.kill(os.getpid(), sig)
    return True


def preexec_die_with_parent(sig: int = signal.SIGTERM):
    """A ``Popen(preexec_fn=...)`` that arms ``sig`` in the child for the death of the process calling Popen."""
    parent = os.getpid()
    prctl = _prctl()  # loaded before the fork: nothing to look up in the child

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return arm


def arm_from_env() -> None:
    """In a process started by run_all.py (a kernel, the auto-batch probe): die with the runner."""
    pid = os.environ.get(RUNNER_ENV, "")
    if pid.isdigit() and int(pid) == _PPID:
        die_with_parent(signal.SIGKILL, int(pid))


# --- process trees ------------------------------------------------------------------------------
def children(pid: int | None = None, since: float | None = None) -> list:
    """The living children of ``pid`` (default: this process); with ``since`` (a ``time.time()``), only those started
    at or after it (what a sweep started, not what its caller had running before)."""
    import psutil

    try:
        kids = psutil.Process(pid or os.getpid()).children()
    except psutil.Error:
        return []
    out = []
    for c in kids:
        try:
            if since is None or c.create_time() >= since - 0.05:
                out.append(c)
        except psutil.Error:
            pass
    return out


def descendants(pid: int | None = None, since: float | None = None) -> list:
    """Every living descendant of ``pid`` (default: this process), children first; with ``since``, only the
    children started at or after it and all of their descendants."""
    import psutil

    out = []
    for c in children(pid, since):
        try:
            out += [c] + c.children(recursive=True)
        except psutil.Error:
            pass
    return out


def signal_all(procs: list, sig: int) -> None:
    import psutil

    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def end_tree(procs: list, grace_s: float = 5.0, first: int = signal.SIGTERM) -> None:
    """Send ``first`` to ``procs``, wait up to ``grace_s`` for them to exit, SIGKILL the rest and reap them."""
    import psutil

    if first is not None:
        signal_all(procs, first)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    signal_all(alive, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=5)


# --- the status file ----------------------------------------------------------------------------


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class StatusFile:
    """``run_status.json`` of a run this process is running: ``update(**fields)`` rewrites it atomically with the
    pid, host and a fresh heartbeat; ``start_heartbeat()`` refreshes the heartbeat from a daemon thread."""

    def __init__(self, path: Path, **fields):
        self.path = Path(path)
        self.state = {**fields, "pid": os.getpid(), "pid_started": _started(os.getpid()), "host": socket.gethostname()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, **fields) -> None:
        """Rewrite the file with ``fields``. Atomically where the folder allows; in a folder that turned read-only
        (no new file can be made in it) the file itself may still be writable: it is then rewritten in place, so
        the status stays true. Raises OSError only when neither works."""
        with self._lock:
            self.state.update(fields)
            self.state["heartbeat"] = time.time()
            self.state["heartbeat_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            try:
                write_json_atomic(self.path, self.state)
            except PermissionError:
                if not (self.path.is_file() and os.access(self.path, os.W_OK)):
                    raise
                rewrite_in_place(self.path, json.dumps(self.state, indent=1, default=str))

    def start_heartbeat(self, interval_s: float = HEARTBEAT_S) -> None:
        def beat():
            while not self._stop.wait(interval_s):
                try:
                    self.update()
                except OSError:  # a full disk: the run itself reports it; the heartbeat must not crash
                    pass

        self._thread = threading.Thread(target=beat, name="loralab-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def still_alive(status: dict) -> str | None:
    """Why the run that wrote ``status`` may still be running (a one-line reason), or None when it is not."""
    if status.get("status") != "running":
        return None
    pid, host = status.get("pid"), status.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        started = _started(pid)
        same = started is not None and (status.get("pid_started") is None
                                        or abs(started - status["pid_started"]) < 2)
        return f"its runner (pid {pid}) is still running on this host" if same else None
    age = time.time() - float(status.get("heartbeat") or 0)
    if age < STALE_S:
        return f"its runner (pid {pid} on {host}) sent a heartbeat {age:.0f} s ago"
    return None


# --- stopping a run on SIGINT / SIGTERM ---------------------------------------------------------
class Interrupted(BaseException):
    """A signal arrived before anything was running: the caller stops at once (nothing to stop in order)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalHandlers:
    """SIGINT and SIGTERM handled by ``_handle`` while a ``with`` block runs, the earlier handlers restored after it.
    Installed only in the main thread (where Python delivers signals); elsewhere the block runs without them."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._saved: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        raise NotImplementedError


class StopOnSignal(SignalHandlers):
    """SIGINT / SIGTERM to the runner, as a request to stop in order.

    Before ``running()`` a signal raises ``Interrupted``. After it, the first signal sends SIGINT once to the
    children this process started since (a kernel runs in its own session, so a terminal's Ctrl-C never reaches it; a training
    loop in it finishes its step, checkpoints and stops) and starts a deadline: after ``grace_s`` seconds, or at
    a second signal, all of their descendants are killed. If the main thread has not called ``finished()`` some seconds
    after that, ``on_stuck()`` runs (it ends the process). ``signum``: the first signal, or None."""

    def __init__(self, grace_s: float = 30.0, on_stuck=None):
        super().__init__()
        self.grace_s, self.on_stuck = grace_s, on_stuck
        self.signum: int | None = None
        self.since: float | None = None  # children started from then on are the run's
        self._running = False
        self._finished = threading.Event()

    def __exit__(self, *exc) -> None:
        self.finished()
        super().__exit__(*exc)

    def running(self) -> None:
        self._running, self.since = True, time.time()

    def finished(self) -> None:
        self._finished.set()

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # asked twice: now
            self.kill_now()
            return
        self.signum = signum
        if not self._running:
            raise Interrupted(signum)
        signal_all(children(since=self.since), signal.SIGINT)
        threading.Thread(target=self._deadline, name="loralab-stop-deadline", daemon=True).start()

    def _deadline(self) -> None:
        if self._finished.wait(self.grace_s):
            return
        self.kill_now()
        if not self._finished.wait(20) and self.on_stuck is not None:
            self.on_stuck()

    def kill_now(self) -> None:
        signal_all(descendants(since=self.since), signal.SIGKILL)
