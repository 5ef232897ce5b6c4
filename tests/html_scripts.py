"""What an HTML output loads: shared by the plotly and JupyterLab tests."""

from html.parser import HTMLParser


def script_srcs(html: str) -> list[str]:
    """The src of every <script> tag in an HTML output (not strings inside scripts: plotly.js holds a few)."""
    srcs = []

    class P(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "script" and dict(attrs).get("src") is not None:
                srcs.append(dict(attrs)["src"])

    P().feed(html)
    return srcs
