"""index.html of a run folder: rendered from ``templates/index.html.j2`` (Jinja2, autoescaped)."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from loralab.run_folder import RunFolder

TEMPLATES = Path(__file__).with_name("templates")
REPORT_06 = "06_report.html"


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def render(run: RunFolder, records: list[dict], summary: dict) -> str:
    """The page: the run's state at the top, the sweep, then every planned notebook (one that never ran has no
    link; a link only to a file that exists)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    by_label = {r["label"]: r for r in records}
    rows = []
    for label in summary.get("plan") or [r["label"] for r in records]:
        r = by_label.get(label)
        if r is None:
            rows.append({"label": label, "record": None})
            continue
        shown = r["status"] if not r.get("failure") or r["status"] != "ok" else "failed"
        rows.append({"label": label, "record": r, "shown": shown, "link": r["html"] if run.has(r["html"]) else None})
    multi = any((s.get("world_size") or 1) > 1 for s in summary.get("sweep", []))
    return env.get_template("index.html.j2").render(
        s=summary, run_dir=str(run.path), notebooks=rows, multi=multi, fmt=_fmt,
        report_link=REPORT_06 if run.has(REPORT_06) else None)


def write(run: RunFolder, records: list[dict], summary: dict) -> None:
    run.write_index(render(run, records, summary))
