"""setup_plotly: figures that JupyterLab and the HTML reports both draw, with nothing fetched from outside."""

import pytest

pio = pytest.importorskip("plotly.io")
go = pytest.importorskip("plotly.graph_objects")

from html_scripts import script_srcs  # noqa: E402

from loralab.report import setup_plotly  # noqa: E402


def bundle():
    return go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]))._repr_mimebundle_()


def test_each_figure_carries_plotly_json_for_jupyterlab_and_html_for_reports():
    setup_plotly()
    first, second = bundle(), bundle()
    for b in (first, second):
        assert "application/vnd.plotly.v1+json" in b  # JupyterLab: plotly's own extension draws it
        assert "text/html" in b  # nbconvert's HTML report
        assert script_srcs(b["text/html"]) == []  # no script from anywhere: no CDN, no MathJax
    assert "window.Plotly" in first["text/html"] and len(first["text/html"]) > 1_000_000  # plotly.js, inline, once
    second_html = second["text/html"]
    assert len(second_html) < 100_000 and "https://" not in second_html and "mathjax" not in second_html.lower()


def test_a_second_setup_embeds_plotly_js_again():
    """Re-running a notebook's set-up cell starts afresh: its next figure carries plotly.js again."""
    setup_plotly()
    bundle()
    setup_plotly()
    assert len(bundle()["text/html"]) > 1_000_000
