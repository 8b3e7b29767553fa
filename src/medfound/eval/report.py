"""A report folder: ``index.md`` and ``index.html`` with tables and pictures, written atomically.

Each stage of the demo (and later each experiment) adds a section; the same content renders as
Markdown (read on a terminal or a forge) and as a self-contained HTML page beside its PNGs.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from medfound.io.atomic import write_text


@dataclass
class Section:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)


class Report:
    """Collects sections; :meth:`write` renders them. Image paths are relative to the report folder."""

    def __init__(self, folder: str | os.PathLike, title: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.sections: list[Section] = []

    def section(self, title: str) -> Section:
        self.sections.append(Section(title))
        return self.sections[-1]

    def text(self, text: str) -> None:
        self.sections[-1].blocks.append(("text", text))

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.sections[-1].blocks.append(("table", (header, rows)))

    def image(self, relpath: str, caption: str = "") -> None:
        self.sections[-1].blocks.append(("image", (relpath, caption)))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for s in self.sections:
            out += [f"## {s.title}", ""]
            for kind, body in s.blocks:
                if kind == "text":
                    out += [str(body), ""]
                elif kind == "table":
                    header, rows = body
                    out.append("| " + " | ".join(map(str, header)) + " |")
                    out.append("|" + "---|" * len(header))
                    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
                    out.append("")
                else:
                    rel, cap = body
                    out += [f"![{cap}]({rel})", f"*{cap}*" if cap else "", ""]
        return "\n".join(out)

    def html(self) -> str:
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 8px}"
                 "th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:0.85em}</style>",
                 f"</head><body><h1>{html.escape(self.title)}</h1>"]
        for s in self.sections:
            parts.append(f"<h2>{html.escape(s.title)}</h2>")
            for kind, body in s.blocks:
                if kind == "text":
                    parts.append(f"<p>{html.escape(str(body))}</p>")
                elif kind == "table":
                    header, rows = body
                    parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
                    parts += ["<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows]
                    parts.append("</table>")
                else:
                    rel, cap = body
                    parts.append(f"<figure><img src='{html.escape(rel)}' alt='{html.escape(cap)}'>"
                                 f"<figcaption>{html.escape(cap)}</figcaption></figure>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def write(self) -> Path:
        write_text(self.folder / "index.md", self.markdown())
        write_text(self.folder / "index.html", self.html())
        return self.folder / "index.html"


def _fmt(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c)
