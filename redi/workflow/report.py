"""The evaluation report: one self-contained HTML page with curves and per-image picture strips.

``write_report`` is called by :func:`redi.workflow.stages.evaluate` and writes::

    report/index.html          the page (inline CSS, relative links only, no JavaScript)
    report/roc.png, pr.png     image-level ROC and precision-recall curves
    report/pro.png             pixel-level PRO curve (only when the test masks hold defects)
    report/histogram.png       image scores, normal vs defective, with the served and F1-optimal thresholds
    report/tradeoff.png        false calls vs escapes at every threshold (validation and test), the
                               served threshold marked, the line's goal shaded
    report/colour_scale.png    the anomaly-map colour scale shared by every strip
    report/images/strip_NNNN.png   input | ground truth | map overlay | the method's pictures (ReDi: recovered, prompt)

The page opens with what the line does at the served threshold: caught, escaped, false calls
(a confusion matrix), recall per defect type, whether any threshold reaches the line's goal
(``eval.goal_recall`` / ``eval.goal_false_call_rate``), and the escaped parts and false calls as
picture strips.

Which images get a strip (at most ``cfg.eval.report_max_images``; the page repeats this rule):
every image the decision threshold gets wrong comes first (most confident mistakes first), then
the remaining places are shared evenly between correctly decided defective and normal images,
each class sampled at evenly spaced ranks of its score order, so clear and borderline cases
both appear. The table lists every test image (sorted by score, highest first); images without
a strip say so.

The map colour scale is fixed for the model (``redi.core.visualize.display_range``: 0 to 2 x the
decision threshold), so a normal image does not look hot merely because its map was stretched.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import matplotlib.patches
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from redi.data.mvtec import Sample
from redi.core.errors import InputError, MetricsError
from redi.core.metrics import pr_curve_points, pro_curve, roc_curve_points
from redi.core.operating_point import decision_stats, tradeoff_curve
from redi.core.visualize import (display_range, draw_boxes, defect_regions, mask_contour, overlay,
                                 save_png, strip)

SYNTHETIC_MARKER = "SYNTHETIC_DATA_README.md"
MAX_TILE = 256  # strip tiles are at most this many pixels square (keeps the report folder small)
STRIP_DIR = "images"


# ----------------------------------------------------------------------------- inputs
def _numpy(tensor: torch.Tensor | np.ndarray | None, dtype: Any = np.float32) -> np.ndarray | None:
    """A CPU numpy copy of a tensor (or array) in ``dtype``; None stays None."""
    if tensor is None:
        return None
    if torch.is_tensor(tensor):
        tensor = tensor.detach().cpu()
        tensor = tensor.float() if dtype != bool else tensor.bool()
        return tensor.numpy().astype(dtype, copy=False)
    return np.asarray(tensor).astype(dtype, copy=False)


def _to_rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def _check_lengths(samples: Sequence[Sample], **arrays: np.ndarray | None) -> int:
    """All inputs must describe the same N images, in the same order."""
    n = len(samples)
    if n == 0:
        raise InputError("write_report needs at least one test sample; the test split is empty")
    for name, arr in arrays.items():
        if arr is not None and arr.shape[0] != n:
            raise InputError(f"write_report got {n} samples but {name} holds {arr.shape[0]} entries; "
                             f"pass the detector's result for exactly the listed samples, in order")
    return n


def find_synthetic_readme(samples: Sequence[Sample]) -> Path | None:
    """The ``SYNTHETIC_DATA_README.md`` in a folder above the first sample's file, if any."""
    if not samples:
        return None
    for parent in Path(samples[0].path).resolve().parents:
        marker = parent / SYNTHETIC_MARKER
        if marker.is_file():
            return marker
    return None


# ----------------------------------------------------------------------------- which images get a strip
def _spread(indices: list[int], count: int) -> list[int]:
    """``count`` entries of ``indices`` at evenly spaced positions (first and last included)."""
    if count <= 0:
        return []
    if count >= len(indices):
        return list(indices)
    positions = np.unique(np.round(np.linspace(0, len(indices) - 1, count)).astype(int))
    return [indices[p] for p in positions]


def select_for_strips(labels: np.ndarray, scores: np.ndarray, decisions: np.ndarray | None,
                      threshold: float, limit: int) -> list[int]:
    """Indices of the images drawn as strips (see the module docstring for the rule).

    ``decisions`` is None when the detector has no threshold: then there are no mistakes to
    list first and the places are shared between defective and normal images only.
    """
    n = len(scores)
    if limit <= 0:
        return []
    if n <= limit:
        return list(range(n))
    wrong = [] if decisions is None else [i for i in range(n) if bool(decisions[i]) != bool(labels[i])]
    wrong.sort(key=lambda i: abs(scores[i] - threshold), reverse=True)
    chosen = wrong[:limit]
    taken = set(chosen)
    by_score = sorted((i for i in range(n) if i not in taken), key=lambda i: scores[i], reverse=True)
    defective = [i for i in by_score if labels[i] == 1]
    normal = [i for i in by_score if labels[i] == 0]
    left = limit - len(chosen)
    n_def = min(len(defective), (left + 1) // 2)
    n_norm = min(len(normal), left - n_def)
    n_def = min(len(defective), left - n_norm)  # give unused normal places back to defects
    return chosen + _spread(defective, n_def) + _spread(normal, n_norm)


# ----------------------------------------------------------------------------- figures
def _figure(width: float = 4.2, height: float = 3.4) -> tuple[Figure, Any]:
    """A matplotlib figure on the Agg canvas (no pyplot: no global state, no display needed)."""
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot(1, 1, 1)


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def _plot_roc(path: Path, labels: np.ndarray, scores: np.ndarray, auroc: float | None,
              operating: tuple[float, float] | None) -> Path:
    fpr, tpr = roc_curve_points(labels, scores)
    figure, ax = _figure()
    ax.plot(fpr, tpr, color="tab:blue", lw=1.8, drawstyle="steps-post", label="ROC")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    if operating is not None:
        ax.plot(*operating, "o", color="tab:red", label="decision threshold")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false-alarm rate (normal images flagged)",
           ylabel="recall (defective images found)",
           title="image-level ROC" + (f", AUROC {auroc:.4f}" if auroc is not None else ""))
    ax.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def _plot_pr(path: Path, labels: np.ndarray, scores: np.ndarray, operating: tuple[float, float] | None) -> Path:
    recall, precision = pr_curve_points(labels, scores)
    figure, ax = _figure()
    ax.plot(recall, precision, color="tab:blue", lw=1.8, label="precision-recall")
    ax.axhline(labels.mean(), color="grey", lw=0.8, ls=":", label="defect share (chance)")
    if operating is not None:
        ax.plot(*operating, "o", color="tab:red", label="decision threshold")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="recall", ylabel="precision",
           title="image-level precision-recall")
    ax.legend(loc="lower left", fontsize=8)
    return _save(figure, path)


def _plot_pro(path: Path, masks: np.ndarray, maps: np.ndarray, max_fpr: float, aupro: float | None) -> Path:
    fpr, pro = pro_curve(masks, maps, max_fpr=max_fpr)
    figure, ax = _figure()
    ax.plot(fpr, pro, color="tab:green", lw=1.8)
    ax.axvline(max_fpr, color="grey", lw=0.8, ls=":")
    ax.set(xlim=(0, min(1.0, max_fpr * 1.05)), ylim=(-0.01, 1.01), xlabel="pixel false-positive rate",
           ylabel="per-region overlap",
           title="pixel-level PRO" + (f", AUPRO {aupro:.4f}" if aupro is not None else ""))
    return _save(figure, path)


def _plot_histogram(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float,
                    f1_threshold: float | None) -> Path:
    figure, ax = _figure(5.6, 3.4)
    edges = np.histogram_bin_edges(scores, bins=int(np.clip(len(scores) // 3, 5, 40)))
    for value, name, colour in ((0, "normal", "tab:blue"), (1, "defective", "tab:red")):
        if (labels == value).any():
            count = int((labels == value).sum())
            ax.hist(scores[labels == value], bins=edges, alpha=0.6, color=colour, label=f"{name} ({count})")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="black", lw=1.5, label=f"served threshold {threshold:.4f}")
    if f1_threshold is not None:
        ax.axvline(f1_threshold, color="black", lw=1.0, ls="--", label=f"F1-optimal on test {f1_threshold:.4f}")
    ax.set(xlabel="image anomaly score", ylabel="images", title="score distribution")
    ax.legend(fontsize=8)
    return _save(figure, path)


def _plot_tradeoff(path: Path, curves: list[tuple[str, np.ndarray, np.ndarray, str]], threshold: float,
                   f1_threshold: float | None, goal: tuple[float, float]) -> Path:
    """False calls (good parts flagged) against escapes (defects passed), one curve per labelled set,
    with the served threshold (and the test set's F1-optimal one) marked on each."""
    figure, ax = _figure(8.6, 4.0)
    upper = 10.0  # % false calls shown: up to where every curve has caught every defect (the rest is flat)
    for name, labels, scores, colour in curves:
        curve = tradeoff_curve(labels, scores)
        upper = max(upper, 1.2 * 100 * float(curve["false_call_rate"][curve["escape_rate"] <= 0].min()))
        ax.plot(curve["false_call_rate"] * 100, curve["escape_rate"] * 100, color=colour, lw=1.8,
                drawstyle="steps-post", label=name)
        point = decision_stats(labels, scores, threshold)
        ax.plot(point["false_call_rate"] * 100, point["escape_rate"] * 100, "o", color=colour, ms=8, mec="black",
                label=f"{name} at the served threshold", zorder=5)  # above the F1 square where they meet
        if f1_threshold is not None and name.startswith("test"):
            best = decision_stats(labels, scores, f1_threshold)
            ax.plot(best["false_call_rate"] * 100, best["escape_rate"] * 100, "s", color=colour, ms=10,
                    mfc="white", label="test at the F1-optimal threshold", zorder=4)
    recall, false_calls = goal
    ax.add_patch(matplotlib.patches.Rectangle((0, 0), false_calls * 100, (1 - recall) * 100, color="tab:green",
                                              alpha=0.2, label=f"goal: recall >= {recall:.0%}, false calls <= "
                                                               f"{false_calls:.0%}"))
    ax.set(xlim=(-0.5, min(101.0, upper)), ylim=(-1, 101), xlabel="false calls: good parts flagged (%)",
           ylabel="escapes: defects passed (%)", title=f"operating point, served threshold {threshold:.4g}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the axes: the curves stay clear
    return _save(figure, path)


def _plot_colour_scale(path: Path, vmin: float, vmax: float, threshold: float, cmap: str) -> Path:
    figure = Figure(figsize=(5.6, 0.9), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_axes((0.05, 0.5, 0.9, 0.3))
    ax.imshow(np.linspace(vmin, vmax, 256)[None, :], aspect="auto", cmap=matplotlib.colormaps[cmap],
              extent=(vmin, vmax, 0, 1))
    if math.isfinite(threshold):
        ax.axvline(threshold, color="white", lw=1.5)
        ax.text(threshold, 1.15, "threshold", ha="center", fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_yticks([])
    ax.tick_params(labelsize=7)
    figure.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- strips
def _strip_picture(i: int, rgb: np.ndarray, sample: Sample, mask: np.ndarray, amap: np.ndarray,
                   pictures: dict[str, np.ndarray], threshold: float, vmin: float, vmax: float,
                   tile: int) -> np.ndarray:
    """Input | ground truth | overlay with boxes above the threshold | the method's own pictures
    (ReDi: the recovered image and its prompt)."""
    image = rgb[i]
    if mask[i].any():
        truth, truth_caption = mask_contour(image, mask[i], thickness=max(1, image.shape[0] // 128)), "ground truth"
    elif sample.label == 1:
        truth, truth_caption = image, "no mask file"
    else:
        truth, truth_caption = image, "ground truth: good"
    heat = overlay(image, amap[i], vmin, vmax)
    if math.isfinite(threshold):
        scale = image.shape[1] / amap[i].shape[1]
        heat = draw_boxes(heat, defect_regions(amap[i], threshold, min_area=16), scale=scale)
    tiles = [(image, "input"), (truth, truth_caption), (heat, f"map, max {float(amap[i].max()):.4f}")]
    tiles += [(picture[i], name) for name, picture in pictures.items()]
    return strip(tiles, tile_size=tile)


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.5em;color:#222;max-width:1500px}
h1{font-size:1.5em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.9em} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2} .num{text-align:right;font-variant-numeric:tabular-nums}
.meta td:first-child{font-weight:600} .wrong{background:#fde2e2} .ok{background:#e6f4e6}
.synthetic{background:#fff3cd;border:2px solid #d39e00;padding:.8em 1em;margin:1em 0;font-size:1.05em}
.synthetic pre{white-space:pre-wrap;font-size:.85em;max-height:12em;overflow:auto}
.curves img{margin:4px;border:1px solid #ddd;vertical-align:top} .strip{max-width:100%;height:auto}
.note{color:#555;font-size:.9em}
.verdict{background:#eef4fb;border:2px solid #2f6db5;padding:.8em 1em;margin:1em 0;font-size:1.1em}
.confusion td,.confusion th{padding:6px 14px;font-size:1.05em} figure.mistake{margin:.5em 0}
figure.mistake figcaption{font-size:.85em;color:#333}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}f}"
    return str(value)


def _metrics_rows(metrics: dict[str, Any], computed: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, formatted value) rows; the evaluation's own numbers win over the recomputed ones."""
    def get(key: str) -> Any:
        return metrics.get(key, computed.get(key))
    pixel_note = "n/a (no ground-truth masks)"
    rows = [
        ("image AUROC", _fmt(get("image_auroc"))),
        ("pixel AUROC", _fmt(get("pixel_auroc")) if get("pixel_auroc") is not None else pixel_note),
        ("pixel AP", _fmt(get("pixel_ap")) if get("pixel_ap") is not None else pixel_note),
        (f"AUPRO (FPR up to {_fmt(computed['max_fpr'], 2)})",
         _fmt(get("aupro")) if get("aupro") is not None else pixel_note),
        ("F1-optimal threshold (on this test set)", _fmt(get("f1_threshold"))),
        ("best image F1", _fmt(get("f1"))),
        (f"served threshold (set on held-out normal images; {_policy_text(metrics)})", _fmt(get("threshold"))),
        ("recall at the decision threshold", _fmt(get("recall_at_threshold"))),
        ("false-alarm rate at the decision threshold", _fmt(get("false_alarm_rate_at_threshold"))),
        ("accuracy at the decision threshold", _fmt(get("accuracy_at_threshold"))),
        ("images (defective / normal)", f"{_fmt(get('n_images'))} ({_fmt(get('n_anomalous'))} / "
                                        f"{_fmt(get('n_normal'))})"),
    ]
    if metrics.get("seconds_per_image") is not None:
        device = f" on {metrics['device']}" if metrics.get("device") else ""
        rows.append(("seconds per image", f"{_fmt(metrics['seconds_per_image'])}{device}"))
    return rows


def _decision_stats(labels: np.ndarray, decisions: np.ndarray | None) -> dict[str, Any]:
    """Recall, false-alarm rate and accuracy at the threshold (None where undefined)."""
    stats: dict[str, Any] = {"n_images": int(labels.size), "n_anomalous": int(labels.sum()),
                             "n_normal": int((labels == 0).sum())}
    if decisions is None:
        return stats
    stats["accuracy_at_threshold"] = float((decisions == labels.astype(bool)).mean())
    stats["recall_at_threshold"] = float(decisions[labels == 1].mean()) if (labels == 1).any() else None
    stats["false_alarm_rate_at_threshold"] = float(decisions[labels == 0].mean()) if (labels == 0).any() else None
    return stats


def _header(detector, metrics: dict[str, Any], samples: Sequence[Sample], synthetic: Path | None) -> list[str]:
    meta = dict(getattr(detector, "metadata", {}) or {})
    cfg = detector.cfg

    def pick(key: str, fallback: Any) -> Any:
        return meta.get(key) or metrics.get(key) or fallback
    line = pick("line", "") or "(unnamed line)"
    rows = [("line", line), ("model version", pick("version", metrics.get("model_version") or "n/a")),
            ("profile", pick("profile", cfg.profile)), ("backbone", pick("backbone", cfg.model.backbone)),
            # the strips show the model's input: letterboxed pictures have black bars by design
            ("input", f"{detector.input_hw[0]} x {detector.input_hw[1]} px (height x width), {cfg.data.aspect} "
                      f"(data.aspect)"),
            ("model created", meta.get("created", "n/a")), ("redi version", meta.get("redi_version", "n/a")),
            ("test data", metrics.get("data_root") or Path(samples[0].path).parent.parent.parent)]
    out = [f"<h1>Anomaly detection report: {_esc(line)}</h1>"]
    if synthetic is not None:
        text = synthetic.read_text(errors="replace")[:2000]
        out.append(f'<div class="synthetic"><strong>SYNTHETIC DATA.</strong> The test images come from a '
                   f"generated data set (marked by {_esc(synthetic)}). The numbers below show that the "
                   f"pipeline works; they say nothing about how the model performs on real products."
                   f"<pre>{_esc(text)}</pre></div>")
    out.append('<table class="meta">' + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
               + "</table>")
    return out


def _image_table(order: list[int], samples: Sequence[Sample], scores: np.ndarray,
                 decisions: np.ndarray | None, strips: dict[int, str]) -> list[str]:
    out = ['<table class="images"><tr><th>#</th><th>image id</th><th>defect type</th><th>score</th>'
           "<th>decision</th><th>correct?</th><th>input | ground truth | map | what the method made</th></tr>"]
    for rank, i in enumerate(order, start=1):
        sample = samples[i]
        if decisions is None:
            decision, correct, css = "n/a", "n/a", ""
        else:
            flagged = bool(decisions[i])
            right = flagged == bool(sample.label)
            decision, correct = ("defective" if flagged else "normal"), ("yes" if right else "NO")
            css = ' class="ok"' if right else ' class="wrong"'
        picture = (f'<img class="strip" loading="lazy" src="{_esc(strips[i])}" alt="{_esc(sample.image_id)}">'
                   if i in strips else '<span class="note">not drawn</span>')
        out.append(f"<tr{css}><td class=\"num\">{rank}</td><td>{_esc(sample.image_id)}</td>"
                   f"<td>{_esc(sample.defect_type)}</td><td class=\"num\">{_fmt(float(scores[i]))}</td>"
                   f"<td>{decision}</td><td>{correct}</td><td>{picture}</td></tr>")
    out.append("</table>")
    return out


def _curves(report_dir: Path, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
            threshold: float, metrics: dict[str, Any], stats: dict[str, Any], max_fpr: float) -> list[str]:
    """Draw the curve figures; return the HTML for them (or why one is missing)."""
    html_parts, notes = [], []
    operating_roc = operating_pr = None
    if stats.get("recall_at_threshold") is not None and stats.get("false_alarm_rate_at_threshold") is not None:
        operating_roc = (stats["false_alarm_rate_at_threshold"], stats["recall_at_threshold"])
        flagged = scores > threshold
        if flagged.any():
            operating_pr = (stats["recall_at_threshold"], float(labels[flagged].mean()))
    try:
        _plot_roc(report_dir / "roc.png", labels, scores, metrics.get("image_auroc"), operating_roc)
        _plot_pr(report_dir / "pr.png", labels, scores, operating_pr)
        html_parts += ['<img src="roc.png" alt="image-level ROC curve">',
                       '<img src="pr.png" alt="image-level PR curve">']
    except MetricsError as exc:
        notes.append(f"ROC and PR curves not drawn: {exc}")
    if masks.shape != maps.shape:
        notes.append(f"PRO curve not drawn: masks {masks.shape} and maps {maps.shape} differ in size.")
    elif masks.any() and (~masks).any():
        _plot_pro(report_dir / "pro.png", masks, maps, max_fpr, metrics.get("aupro"))
        html_parts.append('<img src="pro.png" alt="pixel-level PRO curve">')
    else:
        notes.append("PRO curve not drawn: the test masks hold no defect pixels (image-level labels only).")
    _plot_histogram(report_dir / "histogram.png", labels, scores, threshold, metrics.get("f1_threshold"))
    html_parts.append('<img src="histogram.png" alt="score histogram">')
    return (['<div class="curves">'] + html_parts + ["</div>"]
            + [f'<p class="note">{_esc(n)}</p>' for n in notes])


# ----------------------------------------------------------------------------- the operating point
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _policy_text(metrics: dict[str, Any]) -> str:
    policy, target = metrics.get("threshold_policy"), metrics.get("false_call_target")
    if policy in (None, "max") or target is None:
        return f"policy {policy or 'max'}: a quantile of the held-out normal scores"
    return f"policy {policy}, false-call target {target:.1%} of good parts"


def _confusion_table(point: dict[str, Any]) -> str:
    return ('<table class="confusion"><tr><th></th><th>flagged (reject)</th><th>passed</th></tr>'
            f'<tr><th>defective parts</th><td class="num ok">{point["tp"]} caught</td>'
            f'<td class="num wrong">{point["fn"]} escaped</td></tr>'
            f'<tr><th>good parts</th><td class="num wrong">{point["fp"]} false calls</td>'
            f'<td class="num ok">{point["tn"]} passed</td></tr></table>')


def _achievable_text(reach: dict[str, Any] | None) -> str:
    if reach is None:
        return "The test set lacks defective or good parts: no threshold trade-off can be measured on it."
    goal = reach["target"]
    best, low = reach["best_recall_within_false_calls"], reach["lowest_false_calls_at_recall"]
    head = (f"The line's goal (recall &ge; {goal['min_recall']:.0%} with false calls &le; "
            f"{goal['max_false_call_rate']:.0%}) ")
    head += ("<strong>is reachable</strong> on this test set by some threshold." if reach["met"] else
             "<strong>is not reachable</strong> on this test set by any threshold: these scores do not separate "
             "the parts well enough.")
    return (f"{head} Best recall with false calls &le; {goal['max_false_call_rate']:.0%}: "
            f"{_pct(best['recall'])} (threshold {best['threshold']:.4g}); fewest false calls with recall &ge; "
            f"{goal['min_recall']:.0%}: {_pct(low['false_call_rate'])} (threshold {low['threshold']:.4g}).")


def _operating_section(report_dir: Path, metrics: dict[str, Any], labels: np.ndarray, scores: np.ndarray,
                       validation: dict[str, Any] | None, threshold: float, goal: tuple[float, float]) -> list[str]:
    """What the line will do at the served threshold: verdict box, confusion matrix, recall per
    defect type, whether the goal pair is reachable, and the false-call vs escape curve."""
    point = metrics.get("operating_point") or decision_stats(labels, scores, threshold)
    out = ["<h2>What the line does at the served threshold</h2>",
           f'<div class="verdict"><strong>Served threshold {threshold:.4f}</strong> ({_esc(_policy_text(metrics))}). '
           f"On this test set it <strong>catches {point['tp']} of {point['tp'] + point['fn']} defective parts "
           f"({_pct(point['recall'])})</strong>, lets <strong>{point['fn']} escape</strong>, and flags "
           f"<strong>{point['fp']} of {point['fp'] + point['tn']} good parts ({_pct(point['false_call_rate'])} "
           f"false calls)</strong>.</div>", _confusion_table(point)]
    if metrics.get("threshold_note"):
        out.append(f'<p class="wrong">Set from few normals: {_esc(metrics["threshold_note"])}.</p>')
    per_type = metrics.get("recall_per_type") or {}
    if per_type:
        out.append("<h3>Recall per defect type (at the served threshold)</h3><table><tr><th>defect type</th>"
                   "<th>parts</th><th>caught</th><th>recall</th></tr>")
        out += [f'<tr><td>{_esc(k)}</td><td class="num">{v["n"]}</td><td class="num">{v["caught"]}</td>'
                f'<td class="num">{_pct(v["recall"])}</td></tr>' for k, v in per_type.items()]
        out.append("</table>")
    out.append(f'<p>{_achievable_text(metrics.get("achievable"))}</p>')
    curves = []
    if validation is not None:
        curves.append(("validation (held-out normals + synthetic defects)", validation["labels"],
                       validation["scores"], "tab:orange"))
    if labels.any() and not labels.all():
        curves.append(("test (labelled)", labels, scores, "tab:blue"))
    if curves:
        _plot_tradeoff(report_dir / "tradeoff.png", curves, threshold, metrics.get("f1_threshold"), goal)
        out.append('<p><img src="tradeoff.png" alt="false calls against escapes at every threshold"></p>')
    notes = ['The curve shows every threshold: moving it trades false calls (good parts sent to '
             're-inspection) against escapes (defective parts shipped). The filled dot is the served threshold.']
    if validation is None:
        notes.append("No validation curve: the held-out normals of this detector are not in this data folder.")
    else:
        val = metrics.get("validation") or {}
        notes.append(f"Validation uses no labelled defect: its recall at the served threshold is "
                     f"{_pct(val.get('recall_at_threshold'))} on {val.get('n_synthetic', 'n/a')} synthetic defects; "
                     f"its false calls ({_pct(val.get('false_call_rate_at_threshold'))}) are in-sample, on the very "
                     f"normals that set the threshold.")
    out += [f'<p class="note">{_esc(n)}</p>' for n in notes]
    return out


def _candidates_section(summary: dict[str, Any] | None) -> list[str]:
    """The line's candidates side by side, validation (what chose) and test (what it would have
    been worth), and how well validation ranked them."""
    if not summary:
        return []
    out = ["<h2>Candidates: chosen on validation, checked on test</h2>",
           f'<p class="note">Rule, fixed before any test number: {_esc(summary.get("rule"))}. Validation uses the '
           "held-out normal training images and synthetic defects drawn on them; no test label enters the choice. "
           "Recall and false calls are at each candidate's own served threshold.</p>",
           "<table><tr><th>candidate</th><th>selection score</th><th>val image AUROC</th><th>val pixel AP</th>"
           "<th>val recall @thr</th><th>test image AUROC</th><th>test pixel AP</th><th>test AUPRO</th>"
           "<th>test recall @thr</th><th>test false calls @thr</th><th>ms / image</th></tr>"]
    for row in summary["rows"]:
        val, test = row.get("validation") or {}, row.get("test") or {}
        name = f"<b>{_esc(row['name'])} (champion)</b>" if row.get("chosen") else _esc(row["name"])
        ms = test.get("seconds_per_image")
        cells = [_fmt(row.get("selection_score")), _pct(val.get("image_auroc")), _pct(val.get("pixel_ap")),
                 _pct(val.get("recall_at_threshold")), _pct(test.get("image_auroc")), _pct(test.get("pixel_ap")),
                 _pct(test.get("aupro")), _pct(test.get("recall_at_threshold")),
                 _pct(test.get("false_call_rate_at_threshold")), "n/a" if ms is None else f"{1000 * ms:.0f}"]
        out.append(f"<tr><td>{name}</td>" + "".join(f'<td class="num">{_esc(c)}</td>' for c in cells) + "</tr>")
    out.append("</table>")
    if "test_best" in summary:
        verdict = ("Validation picked the candidate that is best on test by the same formula."
                   if summary["validation_picked_test_best"] else
                   f"Validation picked {summary['champion']}; by the same formula on test, {summary['test_best']} "
                   f"would have been better.")
        gaps = ", ".join(f"{key.removeprefix('champion_gap_').replace('_', ' ')} {100 * value:.1f} points"
                         for key, value in summary.items() if key.startswith("champion_gap_"))
        out.append(f'<p>{_esc(verdict)} Kendall tau between the validation and test rankings: '
                   f'{_esc(_fmt(summary.get("kendall_tau"), 2))}. The champion is behind the best candidate on test by: '
                   f'{_esc(gaps or "n/a")}.</p>')
    return out


def _gallery(title: str, empty: str, indices: list[int], samples: Sequence[Sample], scores: np.ndarray,
             strips: dict[int, str]) -> list[str]:
    """A titled list of picture strips (escapes or false calls), most confident mistakes first."""
    out = [f"<h3>{_esc(title)} ({len(indices)})</h3>"]
    if not indices:
        return out + [f'<p class="note">{_esc(empty)}</p>']
    for i in indices:
        caption = f"{samples[i].image_id} ({samples[i].defect_type}), score {float(scores[i]):.4f}"
        picture = (f'<img class="strip" loading="lazy" src="{_esc(strips[i])}" alt="{_esc(samples[i].image_id)}">'
                   if i in strips else '<span class="note">not drawn (eval.report_max_images)</span>')
        out.append(f'<figure class="mistake">{picture}<figcaption>{_esc(caption)}</figcaption></figure>')
    return out


# ----------------------------------------------------------------------------- curve data (DVC plots)
PLOT_POINTS = 1000  # at most this many rows per PRO curve file (one point per pixel score is ~10^5)


def _write_csv(path: Path, columns: dict[str, np.ndarray]) -> Path:
    names = list(columns)
    rows = zip(*(np.asarray(columns[name], dtype=np.float64) for name in names))
    lines = [",".join(names)] + [",".join(f"{value:.6g}" for value in row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _thin(fpr: np.ndarray, *others: np.ndarray, points: int = PLOT_POINTS) -> list[np.ndarray]:
    """Keep the points nearest to ``points`` evenly spaced FPR values (and the last point): the
    curve as drawn, in a file a browser plots at once."""
    if fpr.size <= points:
        return [fpr, *others]
    keep = np.unique(np.r_[np.searchsorted(fpr, np.linspace(0.0, fpr[-1], points)).clip(0, fpr.size - 1),
                           fpr.size - 1])
    return [fpr[keep]] + [other[keep] for other in others]


def write_curve_data(out_dir: str | Path, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None,
                     maps: np.ndarray | None, max_fpr: float, validation: dict[str, Any] | None = None) -> Path:
    """Write the report's curves as CSV files in ``out_dir`` for ``dvc plots show/diff``.

    Files: ``roc.csv`` (fpr, tpr) and ``pr.csv`` (recall, precision) at image level; ``pro.csv``
    (fpr, pro) up to ``max_fpr`` at pixel level; ``tradeoff_test.csv`` and
    ``tradeoff_validation.csv`` (threshold, false_call_rate, escape_rate): the operating-point
    curve on the labelled test set and on the synthetic validation set. A curve the data cannot
    give (one class only, no defect pixels, no validation set) is logged and left out.
    """
    from redi.methods.common import log_stage

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.csv"):  # a curve this run cannot draw must not survive from an earlier run
        old.unlink()
    scores = np.asarray(scores, dtype=np.float64)
    try:
        fpr, tpr = roc_curve_points(labels, scores)
        _write_csv(out / "roc.csv", {"fpr": fpr, "tpr": tpr})
        recall, precision = pr_curve_points(labels, scores)
        _write_csv(out / "pr.csv", {"recall": recall, "precision": precision})
        _write_csv(out / "tradeoff_test.csv", tradeoff_curve(labels, scores))
    except MetricsError as exc:
        log_stage("evaluate", f"no ROC, PR or test operating-point curve data: {exc}")
    if masks is not None and maps is not None and masks.shape == maps.shape and masks.any() and (~masks).any():
        fpr, pro = _thin(*pro_curve(masks, maps, max_fpr=max_fpr))
        _write_csv(out / "pro.csv", {"fpr": fpr, "pro": pro})
    else:
        log_stage("evaluate", "no PRO curve data: the test masks hold no defect pixels")
    if validation is not None:
        _write_csv(out / "tradeoff_validation.csv", tradeoff_curve(validation["labels"], validation["scores"]))
    return out


# ----------------------------------------------------------------------------- entry point
def write_report(report_dir: str | Path, detector, samples: list[Sample], images: torch.Tensor,
                 masks: torch.Tensor, result: dict[str, Any], metrics: dict[str, Any],
                 cmap: str = "inferno", validation: dict[str, Any] | None = None) -> Path:
    """Write ``report_dir/index.html`` and its pictures; return the path of ``index.html``.

    Args:
        report_dir: output folder (created; earlier strips in it are replaced).
        detector: the evaluated detector (:class:`redi.methods.base.AnomalyDetector`; its cfg,
            metadata and threshold are shown).
        samples: the test samples, in the order of the tensors.
        images: (N, 3, H, W) floats in [0, 1]; masks: (N, H, W) bool ground truth, both in the
            model's input geometry (``load_images`` / ``load_masks`` with ``cfg.data.aspect``).
        result: ``scores`` (N,), ``maps`` (N, H, W), optional ``pictures`` (name -> (N, 3, H, W)
            floats in [0, 1], the detector's :meth:`~redi.methods.base.AnomalyDetector.pictures`).
        metrics: what :func:`redi.workflow.stages.evaluate` computed (``metrics.json``'s content).
        cmap: matplotlib colormap of the anomaly maps.
        validation: ``labels``, ``scores`` of the synthetic validation set
            (:func:`redi.workflow.stages.validation_scores`), drawn on the operating-point curve.
    """
    report_dir = Path(report_dir)
    scores = _numpy(result["scores"], np.float64)
    maps = _numpy(result["maps"])
    pictures = {name: _numpy(picture) for name, picture in (result.get("pictures") or {}).items()}
    images_np, masks_np = _numpy(images), _numpy(masks, bool)
    n = _check_lengths(samples, images=images_np, masks=masks_np, scores=scores, maps=maps, **pictures)
    labels = np.array([int(s.label) for s in samples])
    threshold = float(detector.threshold)
    decisions = (_numpy(detector.is_anomalous(torch.from_numpy(scores)), bool)
                 if math.isfinite(threshold) else None)
    stats = _decision_stats(labels, decisions)
    stats["max_fpr"] = float(detector.cfg.eval.max_fpr)
    stats["threshold"] = threshold
    vmin, vmax = display_range(threshold, maps)

    report_dir.mkdir(parents=True, exist_ok=True)
    strip_dir = report_dir / STRIP_DIR
    strip_dir.mkdir(exist_ok=True)
    for old in strip_dir.glob("strip_*.png"):  # a previous run may have drawn other images
        old.unlink()
    rgb = _to_rgb_uint8(images_np)
    pictures_rgb = {name: _to_rgb_uint8(picture) for name, picture in pictures.items()}
    limit = int(detector.cfg.eval.report_max_images)
    chosen = select_for_strips(labels, scores, decisions, threshold, limit)
    tile = min(rgb.shape[1], MAX_TILE)
    strips: dict[int, str] = {}
    for i in chosen:
        picture = _strip_picture(i, rgb, samples[i], masks_np, maps, pictures_rgb, threshold, vmin, vmax, tile)
        save_png(strip_dir / f"strip_{i:04d}.png", picture)
        strips[i] = f"{STRIP_DIR}/strip_{i:04d}.png"
    _plot_colour_scale(report_dir / "colour_scale.png", vmin, vmax, threshold, cmap)

    scale_rule = ("twice the decision threshold" if math.isfinite(threshold) and threshold > 0
                  else "the highest map value: the model has no calibrated threshold")
    synthetic = find_synthetic_readme(samples)
    order = sorted(range(n), key=lambda i: (-scores[i], samples[i].image_id))
    body = _header(detector, metrics, samples, synthetic)
    goal = (float(detector.cfg.eval.goal_recall), float(detector.cfg.eval.goal_false_call_rate))
    if decisions is not None:
        body += _operating_section(report_dir, metrics, labels, scores, validation, threshold, goal)
        by_margin = sorted(range(n), key=lambda i: -abs(scores[i] - threshold))
        body += _gallery("Escaped defective parts", "No defective part passed the served threshold.",
                         [i for i in by_margin if labels[i] == 1 and not decisions[i]], samples, scores, strips)
        body += _gallery("False calls: good parts flagged", "No good part was flagged at the served threshold.",
                         [i for i in by_margin if labels[i] == 0 and decisions[i]], samples, scores, strips)
    body += _candidates_section(metrics.get("candidates"))
    body += ["<h2>Metrics</h2>", "<table>"]
    body += [f'<tr><td>{_esc(k)}</td><td class="num">{_esc(v)}</td></tr>' for k, v in _metrics_rows(metrics, stats)]
    body += ["</table>", '<p class="note">An image is flagged defective when its score (the maximum of its anomaly '
             "map) is above the decision threshold. The F1-optimal threshold is computed on this test set, for "
             "comparison only.</p>"]
    body += ["<h2>Curves</h2>"] + _curves(report_dir, labels, scores, masks_np, maps, threshold, metrics, stats,
                                           stats["max_fpr"])
    body += ["<h2>Images</h2>",
             f'<p class="note">{len(strips)} of {n} test images are drawn (at most {limit}, '
             "<code>eval.report_max_images</code>). Chosen: every image the decision threshold gets wrong first "
             "(most confident mistakes first), then the remaining places shared evenly between correctly decided "
             "defective and normal images, spread over each class's range of scores. The table lists all images, "
             "highest score first. Ground truth is outlined in green; boxes on the map mark regions above the "
             f"decision threshold. Map colours use one fixed scale for this model, {vmin:.4g} to {vmax:.4g} "
             f"({scale_rule}); brighter is more anomalous.</p>",
             '<p><img src="colour_scale.png" alt="anomaly map colour scale"></p>']
    body += _image_table(order, samples, scores, decisions, strips)
    title = _esc(f"redi report: {getattr(detector, 'metadata', {}).get('line') or metrics.get('line') or 'line'}")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    index = report_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
