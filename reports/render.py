"""A report as a list of blocks, written twice: Markdown (images linked) and self-contained HTML.

The HTML embeds every image as a base64 data URI and needs no network. A small inline script
records, once the page has loaded, how many images decoded (`data-images-loaded="ok/total"` on
<body>), so a headless browser can check the page without screenshots.

Blocks carry names, tags and params read back from the tracking store, which others may write: both
outputs escape them. HTML escapes every text (`_inline`); Markdown keeps the report's own `code` and
**bold** and makes the rest inert (`md_inline`): one line per block, no raw HTML, no links.
"""

from __future__ import annotations

import base64
import html
import re
import string
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str  # inline **bold** and `code` only


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    right: tuple[int, ...] = ()  # columns to right-align (numbers)


@dataclass
class Image:
    path: Path  # a PNG in the output folder
    alt: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Image | Code


@dataclass(frozen=True)
class Page:
    """Where the report's sections go: its blocks, and the PNGs written beside it into `out_dir`, each named
    `<prefix><name>.png` (the prefix is the sweep's name where several sweeps share a report; copies made
    with `dataclasses.replace` share `blocks` and `pngs`)."""

    out_dir: Path
    prefix: str = ""
    blocks: list[Block] = field(default_factory=list)
    pngs: list[Path] = field(default_factory=list)

    def png(self, name: str) -> Path:
        return self.out_dir / f"{self.prefix}{name}.png"


def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + md_inline(b.text))
        elif isinstance(b, Para):
            out.append(md_inline(b.text))
        elif isinstance(b, Bullets):
            out.append("\n".join("- " + md_inline(item) for item in b.items))
        elif isinstance(b, Table):

            def row(cells: list[str]) -> str:
                # Every | escaped by exactly one backslash, so cells split where they seem to (GFM tables).
                return "| " + " | ".join(re.sub(r"\\*\|", r"\\|", md_inline(str(c))) for c in cells) + " |"

            rule = ["---:" if i in b.right else "---" for i in range(len(b.header))]
            out.append("\n".join([row(b.header), "| " + " | ".join(rule) + " |", *(row(r) for r in b.rows)]))
        elif isinstance(b, Image):
            alt = md_inline(b.alt).replace("[", "\\[").replace("]", "\\]")
            out.append(f"![{alt}]({b.path.relative_to(out_dir).as_posix()})")
        elif isinstance(b, Code):
            fence = "`" * max(3, 1 + max((len(r) for r in re.findall("`+", b.text)), default=0))  # never closed early
            out.append(f"{fence}\n{b.text}\n{fence}")
    return "\n\n".join(out) + "\n"


_PUNCTUATION = frozenset(string.punctuation)  # what a backslash escapes in Markdown (CommonMark, ASCII only)


def md_inline(text: str) -> str:
    """`text` as one line of Markdown that renders as written, its `code` spans and **bold** aside.

    Outside code spans (found as CommonMark finds them: a run of n backticks up to the next run of exactly
    n, backslash escapes honoured), a `<` that could open an HTML tag, comment or autolink becomes `&lt;`,
    and `](` loses its link meaning. Inside a code span nothing is interpreted, so it stays as it is. Line
    breaks become spaces: no value from the store starts a heading, a list, an HTML block or a new row.
    """
    text = re.sub(r"\r\n|\r|\n", " ", str(text))
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in _PUNCTUATION:
            out.append(text[i : i + 2])
            i += 2
        elif ch == "`":
            j = i
            while j < n and text[j] == "`":
                j += 1
            end = _closing_backticks(text, j, j - i)
            out.append(text[i:j] if end is None else text[i:end])  # an unmatched run is literal backticks
            i = j if end is None else end
        elif ch == "<" and i + 1 < n and (text[i + 1].isalpha() or text[i + 1] in "/!?"):
            out.append("&lt;")
            i += 1
        elif ch == "]" and i + 1 < n and text[i + 1] == "(":
            out.append("]\\(")
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _closing_backticks(text: str, start: int, run: int) -> int | None:
    """The end of the first run of exactly `run` backticks at or after `start` (None when there is none)."""
    k = text.find("`", start)
    while k != -1:
        m = k
        while m < len(text) and text[m] == "`":
            m += 1
        if m - k == run:
            return m
        k = text.find("`", m)
    return None


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2, h3 { line-height: 1.2; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.88em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: .25em .55em; } th { background: #f3f3f3; }
td.r { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafafa; }
code, pre { background: #f5f5f5; font-size: 0.9em; } pre { padding: .7em; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; } figcaption { font-size: .85em; color: #555; }
"""

# Runs after every image has loaded or failed; writes the count for tests and headless checks.
CHECK_IMAGES = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
});
"""


def to_html(blocks: list[Block], title: str) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join(
                "<tr>"
                + "".join(
                    f'<td class="r">{_inline(str(c))}</td>' if i in b.right else f"<td>{_inline(str(c))}</td>"
                    for i, c in enumerate(r)
                )
                + "</tr>"
                for r in b.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            alt = html.escape(b.alt)
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
            )
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text, quote=False)}</code></pre>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n<script>{CHECK_IMAGES}</script>\n</head>\n"
        "<body>\n" + "\n".join(out) + "\n</body>\n</html>\n"
    )


def write(blocks: list[Block], title: str, out_dir: Path) -> list[Path]:
    """report.md and report.html in `out_dir`; returns both paths, Markdown first."""
    md = out_dir / "report.md"
    md.write_text(to_markdown(blocks, out_dir), encoding="utf-8")
    page = out_dir / "report.html"
    page.write_text(to_html(blocks, title), encoding="utf-8")
    return [md, page]
