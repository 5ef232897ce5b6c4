"""What torchrun runs on every rank: ``loralab.train.train_on_rank``, the same function one process runs.

    torchrun --nproc-per-node 2 -m loralab.train_entry --config-json '{"model": "tiny", ...}' --out-dir outputs/x/bs4

``--config-json`` is ``RunConfig.to_dict()`` (or ``@file``) with one batch size. Rank 0 writes the
same files as one process (``steps.jsonl``, ``train_result.json``, ``adapter/``, ``setup.json``);
a rank that runs out of memory alone writes ``rank{r}_result.json`` (``loralab.distributed``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from loralab import distributed as D
from loralab.config import RunConfig
from loralab.lifecycle import die_with_parent
from loralab.train import train_on_rank


def main(argv: list[str] | None = None) -> int:
    die_with_parent(signal.SIGTERM)  # torchrun's agent gone (even by SIGKILL): checkpoint after the step and stop
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-json", required=True, help="RunConfig.to_dict() as JSON (or @file)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--inject-oom-ranks", default="", help="tests: comma-separated ranks that fake an OOM")
    p.add_argument("--inject-oom-step", type=int, default=0)
    a = p.parse_args(argv)
    raw = Path(a.config_json[1:]).read_text() if a.config_json.startswith("@") else a.config_json
    cfg = RunConfig.from_dict(json.loads(raw))
    ctx = D.init(cfg)
    inject = ({int(r) for r in a.inject_oom_ranks.split(",")}, a.inject_oom_step) if a.inject_oom_ranks else None

    def say(msg: str) -> None:
        if ctx.is_main:
            print(f"[loralab] {msg}", flush=True)

    try:
        say(f"{ctx.world_size} rank(s), strategy {ctx.strategy}, device {ctx.device} (rank 0)")
        res = train_on_rank(cfg, Path(a.out_dir), ctx, progress=say, inject_oom=inject)
        say(f"done: status {res.status}, {res.steps_done} steps")
        # out of memory while loading: peers may wait in a collective this rank never joins; torchrun ends them
        return D.OOM_EXIT_CODE if ctx.enabled and (res.oom_memory or {}).get("phase") == "loading the model" else 0
    finally:
        D.teardown(ctx)


if __name__ == "__main__":
    sys.exit(main())
