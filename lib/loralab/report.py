"""What the notebooks share, so each reads like a report: the run's config, banners, tables, offline plotly.

A notebook gets its configuration in one of two ways: run_all.py passes the whole run's ``RunConfig``
as the ``config`` parameter (a dict), or, opened in JupyterLab, it builds one from its own readable
parameters cell with the same defaults and checks (``notebook_config``). Either way the rest of the
notebook sees one ``RunConfig``. Where a notebook writes is the run folder's owner's business (``RunFolder.for_notebook``).
"""

from __future__ import annotations

import pandas as pd

from loralab.config import RunConfig

RANDOM_WEIGHTS_BANNER = (
    "> **Random weights.** This report was made with `{model}`: a model with random weights in a real "
    "shape. Memory, time and FLOPs are real measurements (they do not depend on the weights' values); "
    "loss values and generated summaries mean nothing."
)
TINY_BANNER = (
    "> **Built-in tiny model.** A 2-layer Llama built locally so the whole sweep runs on a laptop CPU "
    "in minutes. Its numbers show how loralab works, not what a 7B model costs; for that run "
    "`--model llama2-7b` (random weights) or a real model folder on a GPU."
)


def notebook_config(config: dict, **params) -> RunConfig:
    """The run's configuration: run_all.py's (``config``) when given, else built from the notebook's own
    parameters (JupyterLab) with run_all.py's defaults and checks."""
    if config:
        return RunConfig.from_dict(config)
    return RunConfig.from_options(**params)


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


def banner(cfg: RunConfig) -> None:
    from IPython.display import Markdown, display

    if cfg.model == "tiny":
        display(Markdown(TINY_BANNER))
    elif cfg.random_weights:
        display(Markdown(RANDOM_WEIGHTS_BANNER.format(model=cfg.model)))


def table(data, na: str = "–", precision: int = 2):
    """A report table: no index column, "–" (or a short reason) where there is no value, ``precision``
    decimals for floats. ``data``: a DataFrame or anything ``pd.DataFrame`` takes (list of row dicts)."""
    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    return df.style.hide(axis="index").format(precision=precision, na_rep=na, thousands=",")


def config_table(cfg: RunConfig) -> pd.DataFrame:
    """Every resolved knob, one row each: printed in every report."""
    d = cfg.to_dict()
    recipe = d.pop("recipe")
    shown = lambda v: "(default)" if v is None else str(v)  # noqa: E731
    rows = [("run", k, shown(v)) for k, v in d.items()] + [("recipe", k, shown(v)) for k, v in recipe.items()]
    return pd.DataFrame(rows, columns=["group", "setting", "value"])
