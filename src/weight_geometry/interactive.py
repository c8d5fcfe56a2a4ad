"""The HTML report of one (model, k): the markdown report as HTML (text, tables, figures inlined)
and interactive similarity heatmaps (Vega-Lite via altair), self-contained: the Vega,
Vega-Lite and vega-embed JavaScript is inlined, so nothing is fetched when it is viewed.

The JavaScript (0.9 MB) ships with the workflow, ``workflow/report/vega-embed-bundle.js``: made
once by vl-convert (:func:`vega_bundle`, about 1.7 s, and an 84 MB package that users then need
not install; run this module to regenerate it after an altair upgrade that changes its
Vega-Lite version). altair and markdown-it are imported by the functions that use them.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .results_io import Analysis, pair_matrix
from .rowspace_nulls import one_head_null
from .similarity import null_mean, null_std

#: The id of the interactive heatmap's element (the browser test looks for it).
CHART_ID = "similarity-interactive"
#: The views of the heatmap's head selector besides the sampled heads.
SAME_INDEX, BEST_MATCH = "all heads: same-index mean", "all heads: best match"
#: The inlined data's keys.
SHORT = {"view": "v", "layer_a": "a", "layer_b": "b", "similarity": "s", "ratio_chance": "rc",
         "z_isotropic": "zi", "ratio_null": "rn", "z_null": "zn"}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1em auto; padding: 0 1em;
       line-height: 1.45; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.85em; display: block;
        overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 2px 6px; }
th { background: #f2f2f2; }
td { text-align: right; }
td:first-child { text-align: left; }
img { max-width: 100%; }
code { background: #f4f4f4; padding: 0 2px; }
#CHART.vega-embed { width: 100%; display: flex; }
"""


def vega_bundle() -> str:
    """vega-embed with Vega and Vega-Lite, one script, for altair's Vega-Lite version (needs
    ``vl-convert-python``)."""
    from altair.utils._importers import import_vl_convert, vl_version_for_vl_convert

    return import_vl_convert().javascript_bundle(vl_version=vl_version_for_vl_convert())


def _cells(view: str, values: np.ndarray, chance: float, iso_std, mean, std,
           null_name: str) -> pd.DataFrame:
    """Off-diagonal cells of one matrix with its nulls (``mean``/``std``: the null the colour is
    relative to; ``iso_std``: the isotropic null's std, a number or a matrix)."""
    a, b = np.nonzero(~np.eye(len(values), dtype=bool))
    iso = np.broadcast_to(iso_std, values.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        rows = {"view": view, "layer_a": a, "layer_b": b, "similarity": values[a, b],
                "ratio_chance": values[a, b] / chance,
                "z_isotropic": (values[a, b] - chance) / iso[a, b],
                "null": null_name, "null_mean": mean[a, b],
                "ratio_null": values[a, b] / mean[a, b],
                "z_null": (values[a, b] - mean[a, b]) / std[a, b] if std is not None
                else np.nan}
    return pd.DataFrame(rows)


def similarity_cells(a: Analysis) -> pd.DataFrame:
    """Every off-diagonal cell of every matrix the heatmap can show: each sampled head's
    similarity across layers (conditional null of that head), the same-index mean over all heads
    (its conditional null) and the best match (the best match of isotropic random weights, its
    only null)."""
    k, d = a.k, a.model["d_model"]
    chance, iso = null_mean(k, d), null_std(k, d)
    n = len(a.best_match)
    pairs = a.layer_pairs
    frames = [_cells(f"head {head}", a.similarity[head], chance, iso,
                     *one_head_null(a.overlaps, k, a.model, head), "conditional")
              for head in sorted(a.similarity)]
    frames.append(_cells(SAME_INDEX, pair_matrix(pairs, "same_index", n), chance,
                         pair_matrix(pairs, "isotropic_std", n),
                         pair_matrix(pairs, "conditional_mean", n),
                         pair_matrix(pairs, "conditional_std", n), "conditional"))
    best_std = pair_matrix(pairs, "best_match_null_std", n)
    frames.append(_cells(BEST_MATCH, a.best_match, chance, best_std,
                         pair_matrix(pairs, "best_match_null_mean", n), best_std,
                         "best match of isotropic weights"))
    out = pd.concat(frames, ignore_index=True)
    numeric = out.select_dtypes("number").columns.difference(["layer_a", "layer_b"])
    out[numeric] = out[numeric].round(4)
    finite = np.isfinite(out[numeric].to_numpy(dtype=float))
    out[numeric] = out[numeric].where(finite)
    return out


def similarity_chart(a: Analysis) -> dict:
    """The Vega-Lite spec of the interactive heatmap: choose the head (or the all-heads
    matrices) in a menu, colour = similarity over its null on a diverging log scale centred on
    1; hover a cell for the layer pair, the similarity, its ratio to chance and its z under each
    null."""
    import altair as alt

    cells = similarity_cells(a)
    views = list(dict.fromkeys(cells["view"]))
    ratio = cells["ratio_null"].to_numpy()
    primary = f"head {a.primary_head}"
    choose = alt.param(name="view", value=primary if primary in views else views[0],
                       bind=alt.binding_select(options=views, name="Head: "))
    finite = ratio[np.isfinite(ratio) & (ratio > 0)]
    # at least [0.5, 2], at most [0.25, 4] (clamped beyond): one scale for every view
    r = float(min(4.0, max(2.0, finite.max(), 1 / finite.min()))) if finite.size else 2.0
    n = len(a.best_match)
    # Inlined by column (one record of arrays, flattened by Vega-Lite into one row per cell):
    # about half the size of one object per cell, and built in milliseconds.
    short = cells.drop(columns=["null", "null_mean"]).rename(columns=SHORT)
    columns = {c: np.where(np.isfinite(short[c]), short[c], None).tolist()
               if short[c].dtype.kind == "f" else short[c].tolist() for c in short.columns}
    title = f"Similarity across layers over its null (top-{a.k})"
    # The data joins the spec after altair has built it (altair would copy and check it).
    chart = alt.Chart(alt.NamedData("cells"), title=title).transform_flatten(
        list(columns)).mark_rect().encode(
        x=alt.X("b:O", title="Layer b", sort=list(range(n))),
        y=alt.Y("a:O", title="Layer a", sort=list(range(n))),
        color=alt.Color("rn:Q", title="× null mean",
                        scale=alt.Scale(type="log", domain=[1 / r, r], domainMid=1,
                                        scheme="redblue", reverse=True, clamp=True)),
        tooltip=[alt.Tooltip("v:N", title="matrix"),
                 alt.Tooltip("a:O", title="layer a"),
                 alt.Tooltip("b:O", title="layer b"),
                 alt.Tooltip("s:Q", title="similarity", format=".4f"),
                 alt.Tooltip("rc:Q", title="× chance k/d", format=".2f"),
                 alt.Tooltip("zi:Q", title="z (isotropic null)", format="+.1f"),
                 alt.Tooltip("null:N", title="colour's null"),
                 alt.Tooltip("rn:Q", title="× its mean", format=".2f"),
                 alt.Tooltip("zn:Q", title="z (that null)", format="+.1f")],
    ).add_params(choose).transform_filter(alt.datum.v == choose).transform_calculate(
        null=alt.expr.if_(alt.datum.v == BEST_MATCH, "best match of isotropic weights",
                          "conditional")).properties(width=520, height=520)
    spec = chart.to_dict(validate=False)
    spec["datasets"] = {"cells": [columns]}
    return spec


def _embed(spec: dict, bundle: str | None) -> tuple[str, str]:
    """(the ``<head>`` script, the ``<body>`` element and call) that render ``spec``."""
    spec = json.dumps(spec, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    head = f"<script>{bundle}</script>" if bundle is not None else ""
    body = (f'<div id="{CHART_ID}"></div>\n<script>vegaEmbed("#{CHART_ID}", {spec},'
            ' {"actions": false}).catch(console.error);</script>')
    return head, body


def _page(title: str, head: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{STYLE.replace('CHART', CHART_ID)}</style>{head}</head>\n"
            f"<body>\n{body}\n</body></html>\n")


def chart_page(a: Analysis, bundle: str, chart: dict | None = None) -> str:
    """The interactive heatmap alone, as a self-contained page (``chart``: the
    :func:`similarity_chart` of ``a``, when already built)."""
    head, body = _embed(chart or similarity_chart(a), bundle)
    intro = ("<p>Choose the head in the menu; hover a cell for the layer pair, the similarity,"
             " its ratio to chance k/d and its z under each null. Colour: similarity over its"
             " null mean (red above, blue below; the diagonal is left out).</p>")
    return _page(f"{a.model['name']} k={a.k}: similarity", head, intro + body)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def report_page(a: Analysis, markdown_text: str, images: dict[str, Path], bundle: str,
                chart: dict | None = None) -> str:
    """The markdown report as one self-contained HTML page: its text and tables, its figures
    inlined (``images``: the markdown's image link -> the file), and the interactive heatmap
    after Experiment 1's figure."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    for link, path in images.items():
        if Path(path).is_file():
            body = body.replace(f'src="{link}"', f'src="{_data_uri(path)}"')
    body = re.sub(r"<h([1-3])>(.*?)</h\1>", lambda m: (
        f'<h{m[1]} id="{_slug(m[2])}">{m[2]}</h{m[1]}>'), body)
    head, embedded = _embed(chart or similarity_chart(a), bundle)
    interactive = ("<h3>Interactive similarity matrices</h3>\n<p>Choose the head in the menu;"
                   " hover a cell for the layer pair, the similarity, its ratio to chance k/d"
                   " and its z under each null.</p>\n" + embedded)
    anchor = body.find("<h2", body.find(">Experiment 1:") + 1)
    body = body[:anchor] + interactive + "\n" + body[anchor:] if anchor > 0 else (
        body + interactive)
    return _page(f"{a.model['name']} k={a.k}: report", head, body)


def _slug(heading: str) -> str:
    """The anchor a Git forge gives a heading (the markdown's ``#appendix-full-tables``)."""
    text = re.sub(r"<[^>]+>", "", html.unescape(heading)).lower()
    return re.sub(r"[^\w\- ]", "", text).strip().replace(" ", "-")


if __name__ == "__main__":
    print(vega_bundle())
