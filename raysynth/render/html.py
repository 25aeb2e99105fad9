"""One report document, two renderings: a self-contained HTML page and its Markdown twin.

A document is a list of blocks (headings, paragraphs, lists, tables, figures, preformatted
text), built once from report.json (``document.py``). The HTML embeds every figure as a base64
``data:`` URI and its style inline, so the single file can be mailed or archived and opens
offline: it has no external ``src`` or ``href``. The Markdown refers to the same figures as PNG
files beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    name: str
    """The PNG's file name beside report.md, and its key in the images given to ``render_html``."""
    caption: str


@dataclass(frozen=True)
class Preformatted:
    text: str


Block = Union[Heading, Paragraph, Bullets, Table, Figure, Preformatted]

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin-top: 1.2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .5em; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
th { background: #f2f2f2; }
caption { caption-side: bottom; font-size: .85em; color: #555; padding-top: .3em; text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .8em; }
"""


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Paragraph):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731 - a pipe would split the cell
            out.append("| " + " | ".join(cell(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b.rows]
            out += ["", f"*{b.caption}*"] if b.caption else []  # a blank line ends the table
            out.append("")
        elif isinstance(b, Figure):
            out += [f"![{b.caption}]({b.name})", "", f"*{b.caption}*", ""]
        elif isinstance(b, Preformatted):
            out += ["```", b.text, "```", ""]
        else:  # pragma: no cover - a programming error
            raise TypeError(f"unknown block {b!r}")
    return "\n".join(out)


def render_html(blocks: list[Block], images: dict[str, bytes], title: str) -> str:
    """The page; every ``Figure`` must have its PNG bytes in ``images``."""
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(str(h))}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b.rows)
            caption = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
            body.append(f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(b, Figure):
            if b.name not in images:
                raise KeyError(f"figure {b.name!r} has no image to embed")
            data = base64.b64encode(images[b.name]).decode("ascii")
            body.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Preformatted):
            body.append(f"<pre>{e(b.text)}</pre>")
        else:  # pragma: no cover - a programming error
            raise TypeError(f"unknown block {b!r}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{e(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
