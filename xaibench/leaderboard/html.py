"""``index.html``: the whole leaderboard in one self-contained page (tables inline, plots as
base64 PNGs, no script, no network) that a person opens in a browser."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd
import yaml

from xaibench.leaderboard.board import SECTION, Leaderboard
from xaibench.leaderboard.tables import (
    HTML,
    LEGEND,
    plots_of,
    rank_cells,
    section_nan,
    section_title,
    wide_cells,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #e3e3e3; text-align: right;
         white-space: nowrap; vertical-align: top; }
.scroll { overflow-x: auto; max-width: 100%; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #444; background: #f6f6f6; }
small { color: #666; } .note { color: #555; font-size: 0.9em; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.curves { display: flex; flex-wrap: wrap; gap: 0.5em; } .curves img { width: 49%; }
details { margin: 0.5em 0; } summary { cursor: pointer; color: #225; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; }
"""


def _table(frame: pd.DataFrame) -> str:
    """Cells already escaped (they hold <b> and <small>)."""
    table = frame.to_html(index=False, escape=False, border=0, na_rep="-")
    return f'<div class="scroll">{table}</div>'


def _image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _escaped(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(str).map(html.escape).rename(columns=html.escape)


def _tests(board: Leaderboard, section: tuple[str, str, str]) -> pd.DataFrame:
    tests = board.tests[(board.tests[SECTION].astype(str) == list(section)).all(axis=1)]
    tests = tests.assign(
        column=[
            f"{c} {'↑' if u else '↓'}"
            for c, u in zip(tests["column"], tests["higher_is_better"], strict=True)
        ],
        p=tests["p"].map(lambda v: f"{v:.3g}"),
        p_holm=tests["p_holm"].map(lambda v: f"{v:.3g}"),
        significant=tests["significant"].map({True: "yes", False: ""}),
    )
    keep = ["column", "method_a", "method_b", "n", "p", "p_holm", "better", "significant", "reason"]
    return _escaped(tests[keep])


def write_index(board: Leaderboard, plots: dict[str, Path], path: Path) -> Path:
    """Write ``index.html`` at ``path`` from the board and its plot files."""
    e = html.escape
    body = [
        f"<h1>Leaderboard: {e(board.name)}</h1>",
        f'<p class="note">Run <code>{e(board.run_id)}</code> of <code>{e(str(board.store))}'
        f"</code>; bootstrap {board.resamples} resamples, seed {board.seed}.</p>",
        f'<p class="note">{e(LEGEND)}.</p>',
        "<ul>",
        *(
            f'<li><a href="#s{i}">{e(section_title(s))}</a></li>'
            for i, s in enumerate(board.sections())
        ),
        "</ul>",
    ]
    for i, section in enumerate(board.sections()):
        frame, notes = wide_cells(board, section, HTML)
        body += [f'<h2 id="s{i}">{e(section_title(section))}</h2>', _table(frame)]
        body += [f'<p class="note">{n}</p>' for n in notes]
        ranks = rank_cells(board, section, HTML)
        if len(ranks):
            body += ["<h3>Ranks (+significant wins/−losses)</h3>", _table(ranks)]
        tests = _tests(board, section)
        if len(tests):
            body += [
                "<details><summary>Pairwise Wilcoxon signed-rank tests (Holm-corrected per "
                f"column), {len(tests)} pairs</summary>",
                _table(tests),
                "</details>",
            ]
        nan = section_nan(board, section)
        if len(nan):
            body += [
                f"<details><summary>NaN values and their reasons ({len(nan)} rows)</summary>",
                _table(_escaped(nan)),
                "</details>",
            ]
        names = plots_of(section, plots)
        bars = [n for n in names if n.endswith("_bars")]
        body += [_image(plots[n], n) for n in bars]
        curves = [_image(plots[n], n) for n in names if n not in bars]
        body += ['<div class="curves">', *curves, "</div>"] if curves else []
    if "seconds" in plots:
        body += ["<h2>Seconds per explanation</h2>", _image(plots["seconds"], "seconds")]
    suite = yaml.safe_dump(board.suite, sort_keys=False, allow_unicode=True)
    body += ["<details><summary>suite.yaml</summary>", f"<pre>{e(suite)}</pre>", "</details>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(board.name)} - xaibench leaderboard</title><style>{STYLE}</style></head>"
        "<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path
