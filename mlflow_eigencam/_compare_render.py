"""Drawing a comparison: the PNG (one image) and the HTML page (self-contained) of ``compare``.

Rows are samples, columns the input then one cell per (run, epoch): the panel cropped from
the logged card at the box the table recorded, or a grey cell saying why there is none.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ._compare_epochs import epoch_list
from .render import encode_png
from .render.text import (BACKGROUND, FONT_SIZE, MUTED, OK, TEXT, WRONG, fit_text, get_font,
                          line_height, text_width)

if TYPE_CHECKING:
    from .compare import CompareResult

__all__ = ["Cell", "render_html", "render_png"]

# Layout of the comparison image, in pixels.
MARGIN = 8
COL_GAP = 4
RUN_GAP = 14  # before each run's group of columns, a rule in its middle
_ROW_GAP = 10
_BAR = 3  # correct / wrong bar under each overlay
_RULE = (200, 200, 200)
EMPTY = (236, 236, 236)


@dataclass
class Cell:
    """One (run, sample, epoch) cell: the panel to show, or why there is none."""

    panel: Optional[np.ndarray]  # (h, w, 3) uint8, None: nothing to show
    empty_text: str = ""
    pred: Optional[str] = None
    correct: Optional[bool] = None
    evr: Optional[float] = None


Grid = Dict[Tuple[int, str, int], Cell]  # (run position, sample_id, epoch) -> cell


def _caption_pred(cell: Cell) -> Tuple[str, str]:
    """(text, mark) for the prediction line."""
    text = f"pred: {cell.pred}" if cell.pred is not None else "pred: -"
    mark = "" if cell.correct is None else ("[OK]" if cell.correct else "[X]")
    return text, mark


def _evr_text(cell: Cell, component: int) -> str:
    if cell.evr is None or not np.isfinite(cell.evr):
        return f"PC{component} n/a"
    return f"PC{component} {cell.evr * 100:.1f}%"


def _short(run_id: str) -> str:
    return run_id[:8]


def _wrap(font, words: List[str], width: int) -> List[str]:
    lines: List[str] = []
    line = ""
    for w in words:
        candidate = f"{line} {w}".strip()
        if line and text_width(font, candidate) > width:
            lines.append(line)
            line = w
        else:
            line = candidate
    if line:
        lines.append(line)
    return [fit_text(font, ln, width) for ln in lines]


def render_png(result: "CompareResult", grid: Grid,
                inputs: Dict[str, np.ndarray], title: str, component: int) -> np.ndarray:
    font, big = get_font(FONT_SIZE), get_font(16)
    lh, blh = line_height(font), line_height(big)
    panels = [c.panel for c in grid.values() if c.panel is not None]
    panels += [p for p in inputs.values() if p is not None]
    cw = max([p.shape[1] for p in panels], default=128)
    ch = max([p.shape[0] for p in panels], default=128)

    # Column x positions: the input, then each run's group after a separating gap.
    xs_input = MARGIN
    cols: List[Tuple[int, int, int]] = []  # (run position, epoch, x)
    group_spans: List[Tuple[int, int]] = []
    x = MARGIN + cw
    rules: List[int] = []
    for pos, r in enumerate(result.runs):
        rules.append(x + RUN_GAP // 2)
        x += RUN_GAP
        start = x
        for e in r.epochs:
            cols.append((pos, e, x))
            x += cw + COL_GAP
        x -= COL_GAP
        group_spans.append((start, x))
    grid_w = x + MARGIN

    legend = [f"run {i + 1}: {r.run_id}  name {r.run_name or '-'}  experiment {r.experiment}  "
              f"epochs {epoch_list(list(r.epochs), 12)} (logged {len(r.logged_epochs)})"
              for i, r in enumerate(result.runs)]
    width = max([grid_w, text_width(big, title) + 2 * MARGIN]
                + [text_width(font, t) + 2 * MARGIN for t in legend])

    footer: List[Tuple[str, Tuple[int, int, int]]] = []
    text_w = width - 2 * MARGIN
    if any(result.unmatched.values()):
        footer.append(("unmatched samples (not logged by every run; not shown above):", WRONG))
        for pos, r in enumerate(result.runs):
            sids = result.unmatched.get(r.run_id, ())
            if not sids or r.run_id in [x.run_id for x in result.runs[:pos]]:
                continue
            words = [f"run {pos + 1} ({_short(r.run_id)}):"] + [
                f"{s} ({result.labels.get(s) or '-'})," for s in sids]
            words[-1] = words[-1].rstrip(",")
            footer += [(ln, TEXT) for ln in _wrap(font, words, text_w)]
    for note in result.notes:
        footer += [(ln, MUTED) for ln in _wrap(font, ("note: " + note).split(" "), text_w)]

    header_h = MARGIN + blh + COL_GAP + len(legend) * lh + _ROW_GAP
    colhead_h = 2 * lh + COL_GAP
    row_h = ch + _BAR + COL_GAP + 2 * lh + _ROW_GAP
    rows = list(result.matched)
    footer_h = (len(footer) * lh + _ROW_GAP) if footer else 0
    height = header_h + colhead_h + len(rows) * row_h + footer_h + MARGIN

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = MARGIN
    draw.text((MARGIN, y), title, fill=TEXT, font=big)
    y += blh + COL_GAP
    for t in legend:
        draw.text((MARGIN, y), fit_text(font, t, text_w), fill=MUTED, font=font)
        y += lh
    y = header_h
    # Column headers: run group names, then epochs.
    draw.text((xs_input, y + lh), "input", fill=TEXT, font=font)
    for pos, (a, b) in enumerate(group_spans):
        draw.text((a, y), fit_text(font, f"run {pos + 1} ({_short(result.runs[pos].run_id)})", b - a),
                  fill=TEXT, font=font)
    for _, e, cx in cols:
        draw.text((cx, y + lh), fit_text(font, f"epoch {e}", cw), fill=TEXT, font=font)
    y += colhead_h
    grid_top = y - 2
    draw.line([(0, grid_top), (grid_w - 1, grid_top)], fill=_RULE)

    for i, sid in enumerate(rows):
        top = y + i * row_h
        if i:
            rule_y = top - _ROW_GAP // 2 - 1
            draw.line([(0, rule_y), (grid_w - 1, rule_y)], fill=_RULE)
        _paste(canvas, draw, inputs.get(sid), xs_input, top, cw, ch, "no input")
        ty = top + ch + _BAR + COL_GAP
        label = result.labels.get(sid)
        draw.text((xs_input, ty), fit_text(font, f"true: {label if label is not None else '-'}", cw),
                  fill=TEXT, font=font)
        draw.text((xs_input, ty + lh), fit_text(font, f"id {sid}", cw), fill=MUTED, font=font)
        for pos, e, cx in cols:
            cell = grid.get((pos, sid, e), Cell(None, "not logged"))
            _paste(canvas, draw, cell.panel, cx, top, cw, ch, cell.empty_text)
            if cell.empty_text == "not logged":
                continue
            if cell.correct is not None:
                draw.rectangle([(cx, top + ch), (cx + cw - 1, top + ch + _BAR - 1)],
                               fill=OK if cell.correct else WRONG)
            text, mark = _caption_pred(cell)
            mark_w = text_width(font, mark) + COL_GAP if mark else 0
            text = fit_text(font, text, max(0, cw - mark_w))
            draw.text((cx, ty), text, fill=TEXT, font=font)
            if mark:
                draw.text((cx + text_width(font, text) + COL_GAP, ty), mark,
                          fill=OK if cell.correct else WRONG, font=font)
            draw.text((cx, ty + lh), fit_text(font, _evr_text(cell, component), cw), fill=MUTED, font=font)
    grid_bottom = header_h + colhead_h + len(rows) * row_h - _ROW_GAP
    for rx in rules:
        draw.line([(rx, header_h), (rx, max(grid_bottom, header_h + colhead_h))], fill=_RULE)

    y = header_h + colhead_h + len(rows) * row_h
    for text, colour in footer:
        draw.text((MARGIN, y), text, fill=colour, font=font)
        y += lh
    return np.asarray(canvas, dtype=np.uint8).copy()


def _paste(canvas, draw, panel: Optional[np.ndarray], x: int, y: int, cw: int, ch: int,
           empty_text: str) -> None:
    if panel is None:
        draw.rectangle([(x, y), (x + cw - 1, y + ch - 1)], fill=EMPTY)
        font = get_font(FONT_SIZE)
        text = fit_text(font, empty_text or "-", cw - 8)
        draw.text((x + (cw - text_width(font, text)) // 2, y + ch // 2 - 6), text,
                  fill=MUTED, font=font)
        return
    # Panels of other sizes (mixed image sizes) are centred in the cell, never rescaled.
    ox, oy = (cw - panel.shape[1]) // 2, (ch - panel.shape[0]) // 2
    canvas.paste(Image.fromarray(panel), (x + ox, y + oy))


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#141414}
h1{font-size:18px;margin:0 0 8px}h2{font-size:16px;margin:24px 0 8px}
table.runs{border-collapse:collapse;font-size:13px;margin-bottom:12px}
table.runs td,table.runs th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.scroll{overflow:auto;max-width:100%;border:1px solid #ddd}
table.grid{border-collapse:separate;border-spacing:0;font-size:12px}
table.grid th,table.grid td{padding:4px;vertical-align:top;text-align:left;background:#fff}
table.grid thead th{position:sticky;top:0;z-index:1;border-bottom:1px solid #ccc;white-space:nowrap}
table.grid thead tr:nth-child(2) th{top:22px}
table.grid .in{position:sticky;left:0;z-index:2;border-right:1px solid #ccc}
table.grid .first{border-left:2px solid #bbb}
table.grid tbody tr+tr td,table.grid tbody tr+tr th{border-top:1px solid #eee}
table.grid tbody th{font-weight:normal}h3{font-size:14px;margin:12px 0 6px}
img{display:block;image-rendering:pixelated}
.cap{margin-top:2px;line-height:1.35;max-width:var(--w)}
.ok{color:#008200;font-weight:600}.bad{color:#c80000;font-weight:600}
.muted{color:#6e6e6e}.empty{background:#ececec;color:#6e6e6e;display:flex;align-items:center;
justify-content:center}
.bar-ok{border-bottom:3px solid #008200}.bar-bad{border-bottom:3px solid #c80000}
.unmatched figure{display:inline-block;margin:0 12px 12px 0;font-size:12px}
"""


def _img(panel: np.ndarray, alt: str) -> str:
    data = base64.b64encode(encode_png(panel)).decode("ascii")
    h, w = panel.shape[:2]
    return (f'<img src="data:image/png;base64,{data}" width="{w}" height="{h}" '
            f'alt="{html.escape(alt)}">')


def render_html(result: "CompareResult", grid: Grid,
                 inputs: Dict[str, np.ndarray], title: str, component: int,
                 uri: str) -> str:
    e = html.escape
    panels = [c.panel for c in grid.values() if c.panel is not None]
    cw = max([p.shape[1] for p in panels], default=128)
    ch = max([p.shape[0] for p in panels], default=128)
    out: List[str] = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        (f'<p class="muted">Tracking URI <code>{e(uri)}</code>. Rows: samples matched across '
         f"runs by sample id (a hash of the image). Columns: the input, then the overlay of "
         f"principal component {component} per run and epoch.</p>"),
        ('<table class="runs"><tr><th></th><th>run id</th><th>name</th><th>experiment</th>'
         "<th>epochs shown</th><th>logged</th></tr>"),
    ]
    for i, r in enumerate(result.runs):
        out.append(f"<tr><td>run {i + 1}</td><td><code>{e(r.run_id)}</code></td>"
                   f"<td>{e(r.run_name or '-')}</td><td>{e(r.experiment)}</td>"
                   f"<td>{e(epoch_list(list(r.epochs)))}</td><td>{len(r.logged_epochs)}</td></tr>")
    out.append("</table>")

    out.append('<div class="scroll"><table class="grid"><thead><tr>'
               '<th class="in" rowspan="2">input</th>')
    for i, r in enumerate(result.runs):
        out.append(f'<th class="first" colspan="{len(r.epochs)}">run {i + 1} '
                   f'<code>{e(_short(r.run_id))}</code> <span class="muted">{e(r.run_name)} '
                   f"&middot; {e(r.experiment)}</span></th>")
    out.append("</tr><tr>")
    for r in result.runs:
        for j, ep in enumerate(r.epochs):
            cls = ' class="first"' if j == 0 else ""
            out.append(f"<th{cls}>epoch {ep}</th>")
    out.append("</tr></thead><tbody>")
    for sid in result.matched:
        label = result.labels.get(sid)
        out.append(f'<tr id="s-{e(sid)}"><th class="in" style="--w:{cw}px">')
        panel = inputs.get(sid)
        out.append(_img(panel, f"input {sid}") if panel is not None else
                   f'<div class="empty" style="width:{cw}px;height:{ch}px">no input</div>')
        out.append(f'<div class="cap">true: {e(label if label is not None else "-")}<br>'
                   f'<span class="muted">id <code>{e(sid)}</code></span></div></th>')
        for pos, r in enumerate(result.runs):
            for j, ep in enumerate(r.epochs):
                cell = grid.get((pos, sid, ep), Cell(None, "not logged"))
                cls = ' class="first"' if j == 0 else ""
                out.append(f'<td{cls} style="--w:{cw}px">')
                bar = "" if cell.correct is None else (" bar-ok" if cell.correct else " bar-bad")
                if cell.panel is not None:
                    out.append(f'<div class="{bar.strip()}">'
                               f'{_img(cell.panel, f"run {r.run_id} epoch {ep} sample {sid}")}</div>')
                else:
                    out.append(f'<div class="empty{bar}" style="width:{cw}px;height:{ch}px">'
                               f"{e(cell.empty_text or '-')}</div>")
                if cell.empty_text != "not logged":
                    text, mark = _caption_pred(cell)
                    mark_html = "" if not mark else (
                        f' <span class="{"ok" if cell.correct else "bad"}">'
                        f'{"&#10003;" if cell.correct else "&#10007;"}</span>')
                    out.append(f'<div class="cap">{e(text)}{mark_html}<br>'
                               f'<span class="muted">{e(_evr_text(cell, component))}</span></div>')
                out.append("</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    if not result.matched:
        out.append("<p>No sample was logged by every run.</p>")

    out.append('<h2 id="unmatched">Unmatched samples</h2>')
    if not any(result.unmatched.values()):
        out.append("<p>None: every sample was logged by every run.</p>")
    else:
        out.append('<p class="muted">Logged by some runs but not all, so not in the table above.</p>'
                   '<div class="unmatched">')
        shown = set()
        for i, r in enumerate(result.runs):
            sids = result.unmatched.get(r.run_id, ())
            if not sids or r.run_id in shown:
                continue
            shown.add(r.run_id)
            out.append(f"<h3>run {i + 1} <code>{e(r.run_id)}</code> ({len(sids)})</h3><div>")
            for sid in sids:
                label = result.labels.get(sid)
                panel = inputs.get(sid)
                img = _img(panel, f"input {sid}") if panel is not None else ""
                out.append(f"<figure>{img}<figcaption>id <code>{e(sid)}</code><br>true: "
                           f"{e(label if label is not None else '-')}</figcaption></figure>")
            out.append("</div>")
        out.append("</div>")
    if result.notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in result.notes) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


