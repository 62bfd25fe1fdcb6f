"""The frame of foodvision's self-contained HTML pages: eval.py's ``report.html``, compare.py's
``leaderboard.html`` and the data audit's page share one style sheet and these helpers. Nothing in a page
is loaded from elsewhere (figures and photos are embedded as data URIs) and there are no scripts."""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

CSS = """
body {font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
  background: #f7f7f8; color: #1f2328; line-height: 1.45}
main {max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px}
h1 {font-size: 1.6em; margin: 0 0 4px} h2 {font-size: 1.2em; margin: 32px 0 10px; border-bottom: 2px solid #f97316;
  padding-bottom: 4px} h3 {font-size: 1em; margin: 18px 0 8px}
.sub {color: #57606a; font-size: 0.9em; margin: 0 0 4px; overflow-wrap: anywhere}
.cards {display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0}
.card {background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 10px 16px; min-width: 120px}
.card .value {font-size: 1.5em; font-weight: 650} .card .name {color: #57606a; font-size: 0.85em}
table {border-collapse: collapse; background: #fff; font-size: 0.9em}
th, td {padding: 5px 10px; border-bottom: 1px solid #e5e7eb; text-align: left; vertical-align: middle}
th {background: #f3f4f6} td.num {text-align: right; font-variant-numeric: tabular-nums}
td.bar {position: relative; min-width: 70px}
td.bar span.fill {position: absolute; left: 0; top: 3px; bottom: 3px; background: #fed7aa; z-index: 0}
td.bar span.v {position: relative; z-index: 1}
tr.low td {color: #b91c1c}
figure {margin: 0} img.fig {max-width: 100%; background: #fff; border: 1px solid #e5e7eb; border-radius: 6px}
.grid {display: flex; flex-wrap: wrap; gap: 14px}
.cam {background: #fff; border: 1px solid #e5e7eb; border-radius: 8px; padding: 8px; width: 340px}
.cam img {width: 160px; height: 160px; image-rendering: auto; border-radius: 4px}
.cam figcaption {font-size: 0.8em; color: #57606a; overflow-wrap: anywhere}
.cam .ok {color: #15803d; font-weight: 600} .cam .wrong {color: #b91c1c; font-weight: 600}
.note {background: #fff7ed; border-left: 4px solid #f97316; padding: 6px 12px; font-size: 0.9em}
code {background: #eef0f2; padding: 1px 4px; border-radius: 3px; font-size: 0.9em}
.card .ci {color: #57606a; font-size: 0.85em; font-variant-numeric: tabular-nums}
"""


def esc(value: Any) -> str:
    """Text as HTML shows it (quotes escaped too: safe inside attributes)."""
    return html.escape(str(value))


def html_page(title: str, body: str) -> str:
    """A whole page: ``body`` (HTML) in the shared frame and style sheet."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body><main>\n{body}\n</main></body>\n</html>\n"
    )


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data`` embedded in the page (an <img> src): nothing is loaded from elsewhere."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def jpeg_bytes(image: Any) -> bytes:
    """A PIL image as JPEG (quality 88: photos in a page, small enough to mail)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def inline_markdown(text: str) -> str:
    """``**bold**`` and ```code``` of compare.py's recommendation as HTML (everything else escaped)."""
    out = esc(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)
