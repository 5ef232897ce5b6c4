"""benchmarks/compare.py end to end on the CPU: the tiny model, the library's step, the committed JSON schema."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "compare_H200_20261130-123927.json"


@pytest.mark.slow
def test_compare_smoke_writes_the_committed_schema_and_the_guard_agrees(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--smoke", "--only", "hf,fast",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,), (md,) = list(tmp_path.glob("smoke_*.json")), list(tmp_path.glob("smoke_*.md"))
    res, ref = json.loads(js.read_text()), json.loads(COMMITTED.read_text())

    # the schema the README's table is made from: every key the committed run wrote is there
    assert set(ref) <= set(res)
    assert list(res["methods"]) == ["hf", "fast"]
    for name, m in res["methods"].items():
        assert m["status"] == "ok", m.get("traceback", m["status"])
        assert set(ref["methods"][name]) - {"guard"} <= set(m)
        (row,) = m["caps"].values()  # the CPU has no cap: one row, "none"
        # slope_gib_per_row needs the allocator's peaks (CUDA)
        assert set(ref["methods"][name]["caps"]["40"]) - {"slope_gib_per_row"} <= set(row)
        assert row["status"] == "ok" and row["batch_size"] == res["max_batch"]
        assert len(row["losses"]) == res["warmup"] + res["steps"] and all(math.isfinite(x) for x in row["losses"])
    assert res["methods"]["hf"]["recipe"]["name"] == "hf-peft" and res["methods"]["fast"]["recipe"]["name"] == "fast"
    assert "| hf | none | 2 |" in md.read_text() and "| fast | none | 2 |" in md.read_text()

    # the guard: same LoRA init, dropout off for hf (its recipe with lora_dropout=0), per-step losses within 1 %
    g = {k: res["methods"][k]["guard"] for k in ("hf", "fast")}
    assert g["hf"]["recipe_lora_dropout"] == 0.05 and g["hf"]["lora_dropout"] == 0.0
    for k in g:
        assert len(g[k]["losses"]) == res["guard_steps"] == 5
        assert all(math.isfinite(x) for x in g[k]["losses"]) and min(g[k]["grad_norms"]) > 0
    rel = max(abs(a - b) / abs(b) for a, b in zip(g["fast"]["losses"], g["hf"]["losses"]))
    assert rel <= 0.01
    v = res["verdicts"]["guard_fast_vs_hf"]
    assert v["pass"] and v["max_rel_diff"] == pytest.approx(rel)
