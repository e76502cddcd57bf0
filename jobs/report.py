"""The comparison report of ``deepfill evaluate`` (and of ``deepfill sweep``, which ends with one): bootstrap
intervals, the Markdown report, a self-contained HTML page and the training-curve plots.

Nothing here reads images, runs a model or talks to MLflow: ``jobs.evaluate`` gathers the numbers (a
``Comparison``) and the pictures, this module turns them into files.

Intervals: a percentile bootstrap of each mean over images. The images are resampled with replacement
(``resamples`` times, ``numpy.random.default_rng(seed)``), the same resampled index sets for every method
and metric (so the intervals of two methods are paired), and the interval is the (1 - level) / 2 and
(1 + level) / 2 quantiles of the resampled means, read off the sorted means without interpolation (an
infinite PSNR of a perfect fill stays finite-safe). Metrics undefined for an image (a hole metric of an
image without a hole: NaN) are left out of that image's means.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

WHOLE_METRICS = ("l1", "l2", "psnr", "ssim", "tv")  # over the whole image
HOLE_METRICS = ("l1_hole", "l2_hole", "psnr_hole", "ssim_hole", "tv_hole")  # over the hole (tv: pairs touching it)
METRICS = WHOLE_METRICS + HOLE_METRICS
PERCENT_METRICS = {"l1", "l2", "tv", "l1_hole", "l2_hole", "tv_hole"}  # shown in %, as in the paper
REPORT_SKIPPED_ROWS = 200  # skipped keys listed in report.md; metrics.json lists them all
BOOTSTRAP_CELLS = 4_000_000  # resampled values held at once (resamples x images x columns), ~32 MB


# ----------------------------------------------------------------------------------------- statistics

def bootstrap_means(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of bootstrap resamples of the rows of ``values``.

    values: float (N, K), one row per image, one column per (method, metric); NaN = undefined for that
    image (left out of the mean). Returns float64 (resamples, K): row r is the NaN-skipping column mean
    over the N rows of resample r (N row indices drawn with replacement). The same ``seed`` gives the same
    index sets whatever K is, so columns are paired. Raises ValueError for no rows or resamples < 1.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]  # (N, 1)
    n, k = values.shape
    if n < 1:
        raise ValueError("bootstrap needs at least one value")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CELLS // (n * k))
    out = np.empty((resamples, k))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        idx = rng.integers(0, n, size=(count, n))  # (count, N) row indices
        with warnings.catch_warnings(), np.errstate(invalid="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: its mean is NaN
            out[start:start + count] = np.nanmean(values[idx], axis=1)  # (count, N, K) -> (count, K)
    return out


def percentile_interval(means: np.ndarray, level: float = 0.95) -> np.ndarray:
    """(lo, hi) per column of resampled means (R, K) -> float64 (K, 2): the sorted means at ranks
    floor(a (R - 1)) and ceil((1 - a) (R - 1)) among the R defined ones, a = (1 - level) / 2 (no interpolation);
    NaN for a column without any."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    means = np.asarray(means, dtype=np.float64)
    if means.ndim == 1:
        means = means[:, None]
    ordered = np.sort(means, axis=0)  # NaN (a resample of only undefined values) sorts last
    alpha = (1.0 - level) / 2.0
    out = np.full((means.shape[1], 2), np.nan)
    for col, valid in enumerate((~np.isnan(means)).sum(axis=0)):  # ranks among the defined resamples
        if valid:
            r = valid - 1
            out[col] = ordered[math.floor(alpha * r), col], ordered[math.ceil((1.0 - alpha) * r), col]
    return out


def bootstrap_interval(values, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """The percentile-bootstrap ``level`` interval (lo, hi) of the mean of the 1-D ``values`` (one per image)."""
    lo, hi = percentile_interval(bootstrap_means(np.asarray(values, np.float64)[:, None], resamples, seed), level)[0]
    return float(lo), float(hi)


# ----------------------------------------------------------------------------------------- what is shown

@dataclass
class Row:
    """One method of the comparison: a model, or a classical baseline."""

    key: str  # identifier in metrics.json, metrics.csv, MLflow metric names and file names (``ours``, ``telea``)
    label: str  # what the report shows (an arm such as ``gan.loss=dcgan,model.attention=none``, a model name)
    kind: str  # "model" or "classical"
    ref: str = ""  # the model reference it was loaded from (redacted); "" for a baseline
    facts: dict = field(default_factory=dict)  # registry facts: model_name, model_version, run_id, arm, step


@dataclass
class Comparison:
    """Everything the report shows, gathered by ``jobs.evaluate``."""

    mask_preset: str
    seed: int
    size: int
    count: int  # images evaluated
    rows: list[Row]
    means: dict[str, dict[str, float]]  # row key -> metric -> mean over images
    intervals: dict[str, dict[str, tuple[float, float]]]  # row key -> metric -> (lo, hi); empty without bootstrap
    truth: dict[str, float]  # the ground truth's own mean "tv" and "tv_hole"
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason code
    resamples: int = 1000
    level: float = 0.95
    inpaint_radius: int = 3
    grid_columns: list[str] = field(default_factory=list)  # what each column of grid.png shows, in order
    curves: list[str] = field(default_factory=list)  # file names of the training-curve plots (curves/<metric>.png)
    notes: list[str] = field(default_factory=list)  # extra lines (e.g. models without training curves)
    title: str = ""


def fmt(metric: str, value: float) -> str:
    """One value as the report shows it: l1, l2 and tv (whole and hole) in %, psnr in dB, ssim as is."""
    if value is None or not math.isfinite(value):
        return str(value)
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f}%"
    if metric.startswith("psnr"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def fmt_interval(metric: str, lo: float, hi: float) -> str:
    """``[lo, hi]`` in the metric's unit, without the % sign (the mean before it carries it)."""
    def one(v):
        if not math.isfinite(v):
            return str(v)
        if metric in PERCENT_METRICS:
            return f"{100 * v:.2f}"
        return f"{v:.2f}" if metric.startswith("psnr") else f"{v:.4f}"

    return f"[{one(lo)}, {one(hi)}]"


def cell(c: Comparison, key: str, metric: str) -> str:
    """The table cell of one row and metric: ``mean [lo, hi]`` (the interval when there is one)."""
    text = fmt(metric, c.means[key][metric])
    interval = c.intervals.get(key, {}).get(metric)
    if interval is not None and not any(v is None or math.isnan(v) for v in interval):
        text += " " + fmt_interval(metric, *interval)
    return text


def md_key(key: str) -> str:
    """A key as a markdown table cell: control characters escaped (as in JSON), ``|`` and backticks defused."""
    text = json.dumps(key, ensure_ascii=False)[1:-1].replace("`", "'").replace("|", "\\|")
    return f"`{text}`"


def _md_text(text: str) -> str:
    """Free text in a markdown table cell: ``|`` escaped, line breaks flattened."""
    return " ".join(str(text).split()).replace("|", "\\|")


def definitions(c: Comparison) -> str:
    """The paragraph that defines every number in the tables."""
    interval = (f"Brackets: the {100 * c.level:g}% percentile-bootstrap interval of each mean ({c.resamples} "
                f"resamples of the images with replacement, the same resamples for every row, fixed seed). "
                if c.intervals else "")
    return (
        "Definitions (images on [0, 1], means over pixels and channels, then over images): l1 = mean |x - y|; "
        "l2 = mean (x - y)^2; psnr = 10 log10(1 / l2) in dB; ssim = Gaussian-window SSIM (Wang et al. 2004, "
        "sigma 1.5, K1 0.01, K2 0.03), mean over channels; tv = mean |horizontal neighbour difference| + mean "
        "|vertical neighbour difference| of the output. The *_hole variants take hole pixels only (ssim_hole: "
        "the SSIM map averaged over the hole; tv_hole: neighbour pairs with at least one hole pixel, the fill "
        "and its seam). l1, l2 and tv are in %, as in the DeepFill paper. " + interval +
        f"Telea and Navier-Stokes are OpenCV's cv2.inpaint with radius {c.inpaint_radius}. Pixel metrics barely "
        "separate methods; look at the pictures too."
    )


def _skipped_markdown(skipped: dict[str, str]) -> list[str]:
    if not skipped:
        return []
    counts = Counter(skipped.values())
    lines = ["## Skipped", "", ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items())) + ".", "",
             "| key | reason |", "|---|---|"]
    for key in sorted(skipped)[:REPORT_SKIPPED_ROWS]:
        lines.append(f"| {md_key(key)} | {skipped[key]} |")
    if len(skipped) > REPORT_SKIPPED_ROWS:
        lines.append(f"\n... and {len(skipped) - REPORT_SKIPPED_ROWS} more, all listed in metrics.json.")
    return [*lines, ""]


def _title(c: Comparison) -> str:
    return c.title or f"Inpainting evaluation: {c.mask_preset} masks, seed {c.seed}"


def _model_line(row: Row) -> str:
    """What a model row is: its reference, registry version, arm."""
    facts = row.facts
    parts = [f"`{row.ref}`"] if row.ref else []
    if "model_version" in facts:
        parts.append(f"registered {facts['model_name']} version {facts['model_version']}")
    if facts.get("run_id"):
        parts.append(f"MLflow run {facts['run_id']}")
    if facts.get("step"):
        parts.append(f"step {facts['step']}")
    return ", ".join(parts)


def markdown(c: Comparison) -> str:
    """report.md: the models, one table for the hole and one for the whole image (a row per method), the
    definitions, the picture grid, the training curves and the skipped keys."""
    models = [r for r in c.rows if r.kind == "model"]
    lines = [f"# {_title(c)}", ""]
    if len(models) == 1 and models[0].key == "ours":
        lines.append(f"Model: {_model_line(models[0])}")
    else:
        lines += ["| model | what |", "|---|---|"]
        lines += [f"| {_md_text(r.label)} | {_md_text(_model_line(r))} |" for r in models]
        lines.append("")
    lines += [f"Images: {c.count} evaluated at {c.size}x{c.size} (centre square, resized)"
              + (f", {len(c.skipped)} skipped (listed below with their reasons)" if c.skipped else "") + ".", ""]
    for title, metrics in (("Hole (hole pixels only)", HOLE_METRICS), ("Whole image", WHOLE_METRICS)):
        lines += [f"## {title}", "", "| method | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
        for row in c.rows:
            lines.append(f"| {_md_text(row.label)} | " + " | ".join(cell(c, row.key, m) for m in metrics) + " |")
        lines.append("")
    lines += [f"Ground truth TV: {fmt('tv', c.truth['tv'])} (whole image), {fmt('tv_hole', c.truth['tv_hole'])} "
              f"(hole).", "", definitions(c), "", "## Pictures", "", "![grid](grid.png)", "",
              "Grid columns: " + " | ".join(c.grid_columns) + ".", ""]
    if c.curves:
        lines += ["## Training curves", ""]
        lines += [f"![{name.rsplit('/', 1)[-1].removesuffix('.png')}]({name})" for name in c.curves]
        lines.append("")
    lines += [*c.notes, *([""] if c.notes else []), *_skipped_markdown(c.skipped)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the HTML page

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.best { font-weight: bold; }
img { max-width: 100%; image-rendering: pixelated; }
.curves { display: flex; flex-wrap: wrap; gap: 1em; }
.curves figure { margin: 0; }
code { font-size: 0.9em; }
p.small { font-size: 0.9em; color: #555; }
"""

_LOWER_IS_BETTER = {"l1", "l2", "l1_hole", "l2_hole"}
_HIGHER_IS_BETTER = {"psnr", "psnr_hole", "ssim", "ssim_hole"}  # tv: closer to the ground truth, not ranked


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _best(c: Comparison, metric: str) -> str | None:
    """The row key with the best finite mean of ``metric`` (None for tv or when nothing is finite)."""
    values = {r.key: c.means[r.key][metric] for r in c.rows if math.isfinite(c.means[r.key][metric])}
    if not values or metric not in _LOWER_IS_BETTER | _HIGHER_IS_BETTER:
        return None
    pick = min if metric in _LOWER_IS_BETTER else max
    return pick(values, key=values.get)


def html_page(c: Comparison, pictures: dict[str, bytes]) -> str:
    """report.html: the report as one self-contained page (every picture inlined as a ``data:`` URI, no
    external scripts, styles or links), readable without MLflow. ``pictures``: file name -> PNG bytes
    (``grid.png``, ``curves/<metric>.png``). The best mean of each ranked metric is bold."""
    e = html.escape
    models = [r for r in c.rows if r.kind == "model"]
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">", f"<title>{e(_title(c))}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{e(_title(c))}</h1>"]
    out += ["<table><tr><th>model</th><th>what</th></tr>"]
    out += [f"<tr><td>{e(r.label)}</td><td>{e(_model_line(r).replace('`', ''))}</td></tr>" for r in models]
    out += ["</table>", f"<p>Images: {c.count} evaluated at {c.size}x{c.size} (centre square, resized)"
            + (f", {len(c.skipped)} skipped (listed below)" if c.skipped else "") + ".</p>"]
    for title, metrics in (("Hole (hole pixels only)", HOLE_METRICS), ("Whole image", WHOLE_METRICS)):
        best = {m: _best(c, m) for m in metrics}
        head = "".join(f"<th>{m}</th>" for m in metrics)
        out += [f"<h2>{e(title)}</h2>", f"<table><tr><th>method</th>{head}</tr>"]
        for row in c.rows:
            cells = "".join(("<td class=\"best\">" if best[m] == row.key else "<td>") + e(cell(c, row.key, m)) + "</td>"
                            for m in metrics)
            out.append(f"<tr><td>{e(row.label)}</td>{cells}</tr>")
        out.append("</table>")
    out += [f"<p>Ground truth TV: {e(fmt('tv', c.truth['tv']))} (whole image), {e(fmt('tv_hole', c.truth['tv_hole']))} "
            "(hole).</p>", f"<p class=\"small\">{e(definitions(c))}</p>"]
    if "grid.png" in pictures:
        out += ["<h2>Pictures</h2>", f"<p>Columns: {e(' | '.join(c.grid_columns))}.</p>",
                f"<img alt=\"grid\" src=\"{data_uri(pictures['grid.png'])}\">"]
    shown = [name for name in c.curves if name in pictures]
    if shown:
        out += ["<h2>Training curves</h2>", "<div class=\"curves\">"]
        out += [f"<figure><img alt=\"{e(name)}\" src=\"{data_uri(pictures[name])}\"></figure>" for name in shown]
        out.append("</div>")
    out += [f"<p>{e(note)}</p>" for note in c.notes]
    if c.skipped:
        counts = Counter(c.skipped.values())
        out += ["<h2>Skipped</h2>", f"<p>{e(', '.join(f'{k}: {n}' for k, n in sorted(counts.items())))}.</p>",
                "<table><tr><th>key</th><th>reason</th></tr>"]
        out += [f"<tr><td><code>{e(json.dumps(k, ensure_ascii=False)[1:-1])}</code></td><td>{e(c.skipped[k])}</td></tr>"
                for k in sorted(c.skipped)[:REPORT_SKIPPED_ROWS]]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------- training curves

CURVE_VALIDATION = ("val_hole_l1", "val_hole_psnr", "val_psnr")  # validation metrics of jobs.trainer


def curve_metrics(names) -> list[str]:
    """The metric names worth a curve, in order: the losses (``g_*`` then ``d_*``, sorted), then validation."""
    names = set(names)
    losses = sorted(n for n in names if n.startswith("g_")) + sorted(n for n in names if n.startswith("d_"))
    return losses + [n for n in CURVE_VALIDATION if n in names]


def plot_curves(histories: dict[str, dict[str, list[tuple[int, float]]]]) -> dict[str, bytes]:
    """One PNG per metric, a line per model: ``histories`` maps a model's label to {metric: [(step, value)]}
    (an MLflow metric history). Returns {"curves/<metric>.png": PNG bytes} for ``curve_metrics`` of all
    the metrics present. Drawn with matplotlib's object API (no pyplot, no global backend)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:  # pragma: no cover - matplotlib comes with mlflow
        raise ImportError("training curves need matplotlib: pip install matplotlib "
                          "(or evaluate with --no-curves)") from err

    out = {}
    for metric in curve_metrics({m for h in histories.values() for m in h}):
        fig = Figure(figsize=(5.0, 3.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for label, history in histories.items():
            points = sorted(history.get(metric, []))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, linewidth=1.2,
                        label=label)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if len(histories) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out[f"curves/{metric}.png"] = buf.getvalue()
    return out
