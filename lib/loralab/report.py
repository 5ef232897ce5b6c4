"""Small helpers the notebooks share, so each notebook reads like a report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from loralab.config import RunConfig, get_recipe

RANDOM_WEIGHTS_BANNER = (
    "> **Random weights.** This report was made with the `{model}` preset: the Llama-2-7B *shape* "
    "with random weights. Memory, time and FLOPs are real measurements (they do not depend on the "
    "weights' values); loss values and generated summaries mean nothing."
)
TINY_BANNER = (
    "> **Built-in tiny model.** A 2-layer Llama built locally so the whole sweep runs on a laptop CPU "
    "in minutes. Its numbers show how loralab works, not what a 7B model costs; for that run "
    "`--model llama2-7b` (random weights) or a real model folder on a GPU."
)


def setup_plotly() -> None:
    """Offline plotly for JupyterLab and for papermill -> nbconvert HTML: nothing is fetched from outside.

    Each figure's output carries two forms. ``application/vnd.plotly.v1+json``: JupyterLab draws it with
    plotly's own JupyterLab extension (installed with plotly, served by the local server). ``text/html``:
    what nbconvert's HTML report shows, a <div> drawn by plotly.js that the first figure after this call
    embeds inline (once; later figures reuse it). No MathJax script: plotly's stock "notebook" renderer
    adds one from a CDN to every figure, so a report or a live notebook would reach for the internet.
    Set explicitly, never auto-detected, so papermill, nbconvert and JupyterLab all get the same outputs.
    """
    import plotly.io as pio
    from plotly.io.base_renderers import MimetypeRenderer

    class OfflineHtml(MimetypeRenderer):
        def __init__(self) -> None:
            self.state = {"plotlyjs_embedded": False}  # shared: plotly renders with a shallow copy of us

        def to_mimebundle(self, fig_dict):
            fig = {k: v for k, v in fig_dict.items() if k != "config"}  # plotly_mimetype adds it in place
            html = pio.to_html(fig, config=fig_dict.get("config"), include_plotlyjs=not self.state["plotlyjs_embedded"],
                               include_mathjax=False, full_html=False, default_width="100%",
                               default_height=525, validate=False)
            self.state["plotlyjs_embedded"] = True
            return {"text/html": html}

    pio.renderers["loralab_offline_html"] = OfflineHtml()  # a fresh one per call: plotly.js again after a re-run
    pio.renderers.default = "plotly_mimetype+loralab_offline_html"


def banner(model: str) -> None:
    from IPython.display import Markdown, display

    if model == "llama2-7b":
        display(Markdown(RANDOM_WEIGHTS_BANNER.format(model=model)))
    elif model == "tiny":
        display(Markdown(TINY_BANNER))


def run_config_from_params(model: str, tokenizer: str, data: str, recipe: str, attn: str, batch_size: int,
                           seq_len: int, packing: bool, epochs: int, max_steps: int, gpu_memory_gib: float,
                           device: str, seed: int) -> RunConfig:
    """The notebooks' flat papermill parameters -> a validated RunConfig (0 / "" mean unset)."""
    r = get_recipe(recipe)
    if attn:
        r = r.replace(attn_implementation=attn)
    return RunConfig(model=model, tokenizer=tokenizer or None, data=data, recipe=r, batch_size=batch_size,
                     seq_len=seq_len, packing=packing, epochs=epochs, max_steps=max_steps or None,
                     device=device, gpu_memory_gib=gpu_memory_gib or None, seed=seed)


def config_table(cfg: RunConfig) -> pd.DataFrame:
    """Every resolved knob, one row each: printed in every report."""
    d = cfg.to_dict()
    recipe = d.pop("recipe")
    shown = lambda v: "(default)" if v is None else str(v)
    rows = [("run", k, shown(v)) for k, v in d.items()] + [("recipe", k, shown(v)) for k, v in recipe.items()]
    return pd.DataFrame(rows, columns=["group", "setting", "value"]).set_index(["group", "setting"])


def write_json(run_dir: str | Path, relpath: str, obj) -> Path:
    p = Path(run_dir) / relpath
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=1, default=str))
    return p


def read_json(run_dir: str | Path, relpath: str):
    p = Path(run_dir) / relpath
    return json.loads(p.read_text()) if p.exists() else None
