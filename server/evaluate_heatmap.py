"""A heatmap picture of the evaluation matrix: rows models, columns sites, cell the task's headline metric.

PNG through matplotlib when it is installed (it is not an Atoll dependency: a SuperLink host should not need a
plotting stack); otherwise an SVG written here by hand. SVG is a few rectangles and text elements, which any
browser shows, so a hand-written file is enough and keeps the server's dependencies as they are.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from xml.sax.saxutils import escape

from server.evaluate_matrix import EvaluationMatrix

# viridis at 0, 0.25, 0.5, 0.75, 1 (matplotlib's values), interpolated linearly: the same reading as the PNG
_VIRIDIS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_MISSING = "#d9d9d9"


def _colour(v: float) -> str:
    v = min(1.0, max(0.0, v)) * (len(_VIRIDIS) - 1)
    i = min(int(v), len(_VIRIDIS) - 2)
    t = v - i
    rgb = [round(a + (b - a) * t) for a, b in zip(_VIRIDIS[i], _VIRIDIS[i + 1])]
    return "#%02x%02x%02x" % tuple(rgb)


def _text_colour(v: float) -> str:
    return "#000000" if v > 0.6 else "#ffffff"


def write_heatmap(matrix: EvaluationMatrix, stem: Path, *, prefer_png: bool = True) -> Path:
    """Write ``stem.png`` (matplotlib) or ``stem.svg``; returns the path written. Older pictures of the other
    format are removed so that the folder holds one picture of the latest evaluation."""
    stem = Path(stem)
    if prefer_png and importlib.util.find_spec("matplotlib") is not None:
        path = _write_png(matrix, stem.with_suffix(".png"))
        stem.with_suffix(".svg").unlink(missing_ok=True)
    else:
        path = _write_svg(matrix, stem.with_suffix(".svg"))
        stem.with_suffix(".png").unlink(missing_ok=True)
    return path


def _title(matrix: EvaluationMatrix) -> str:
    return f"{matrix.run}: {matrix.headline} by model (rows) and evaluating site (columns), round {matrix.round}"


def _write_svg(matrix: EvaluationMatrix, path: Path) -> Path:
    sites = sorted(matrix.sites)
    cw, ch = 120, 40
    left = 40 + 8 * max([len(m.name) for m in matrix.models] + [6])
    top = 70
    width = left + cw * max(1, len(sites)) + 20
    height = top + ch * max(1, len(matrix.models)) + 40 + 16 * len(matrix.notes)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="13">',
           f'<title>{escape(_title(matrix))}</title>',
           f'<text x="10" y="22" font-size="14" font-weight="bold">{escape(_title(matrix))}</text>']
    for j, site in enumerate(sites):
        out.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 10}" text-anchor="middle">{escape(site)}</text>')
    for i, model in enumerate(matrix.models):
        y = top + i * ch
        out.append(f'<text x="{left - 8}" y="{y + ch / 2 + 4}" text-anchor="end">{escape(model.name)}</text>')
        for j, site in enumerate(sites):
            value, why = matrix.headline_value(model.name, site)
            x = left + j * cw
            fill = _colour(value) if value is not None else _MISSING
            label = f"{value:.3f}" if value is not None else why
            ink = _text_colour(value) if value is not None else "#333333"
            out.append(f'<rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" fill="{fill}">'
                       f'<title>{escape(f"{model.name} at {site}: {label}")}</title></rect>')
            out.append(f'<text x="{x + cw / 2}" y="{y + ch / 2 + 4}" text-anchor="middle" fill="{ink}">'
                       f'{escape(label)}</text>')
    y = top + ch * len(matrix.models) + 24
    for note in matrix.notes:
        out.append(f'<text x="10" y="{y}" font-size="11">{escape(note)}</text>')
        y += 16
    out.append("</svg>")
    return _atomic(path, "\n".join(out).encode("utf-8"))


def _write_png(matrix: EvaluationMatrix, path: Path) -> Path:  # pragma: no cover - matplotlib is optional
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sites = sorted(matrix.sites)
    vals = np.full((len(matrix.models), len(sites)), np.nan)
    labels = [["" for _ in sites] for _ in matrix.models]
    for i, m in enumerate(matrix.models):
        for j, s in enumerate(sites):
            v, why = matrix.headline_value(m.name, s)
            vals[i, j] = np.nan if v is None else v
            labels[i][j] = f"{v:.3f}" if v is not None else why
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(sites), 1.2 + 0.6 * len(matrix.models)))
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(matrix.models)), [m.name for m in matrix.models])
    for i in range(len(matrix.models)):
        for j in range(len(sites)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=9,
                    color="black" if np.isnan(vals[i, j]) or vals[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, label=matrix.headline)
    ax.set_title(_title(matrix), fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return _atomic(path, buf.getvalue())


def _atomic(path: Path, data: bytes) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
