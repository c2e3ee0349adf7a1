"""Results of the ablation: the slope fit, results.csv, results.md and the plots.

A result is a flat dict, one per (arm, data size, seed); :data:`COLUMNS` are its keys (missing
ones are written empty). Understanding is ``answer_accuracy`` on the held-out split.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

COLUMNS = [
    "arm", "data_size", "seed", "steps", "docs_seen", "epochs",
    "answer_accuracy", "caption_perplexity",
    "probe_shape", "probe_colour", "probe_position", "probe_size", "probe_mean",
    "retrieval_top1", "retrieval_top5", "retrieval_r2", "retrieval_cos", "retrieval_baseline_cos",
    "final_loss", "final_text", "final_semantic", "final_pixel",
    "final_semantic_r2", "final_semantic_cos", "final_semantic_baseline_cos", "final_semantic_mse",
    "final_semantic_baseline_mse", "final_semantic_pred_var", "final_pixel_r2", "final_pixel_baseline",
    "final_embed_norm_visual", "final_embed_norm_text",
    "train_wall_s", "eval_wall_s", "wall_s",
]

METRIC_LABELS = {
    "answer_accuracy": "answer accuracy (held-out)",
    "caption_perplexity": "caption perplexity (held-out)",
    "probe_mean": "linear-probe accuracy, mean of 4 attributes",
    "retrieval_top1": "semantic retrieval top-1",
    "retrieval_r2": "semantic R² (held-out; 0 = the mean predictor)",
    "final_semantic_r2": "semantic R² (train, last 10 steps; 0 = the mean predictor)",
    "final_pixel_r2": "pixel loss gain over the condition-free denoiser (train)",
    "final_text": "final train text loss",
}


def fit_log_slope(xs: Sequence[float], ys: Sequence[float]) -> Tuple[float, float]:
    """Least-squares fit y = a + b * log10(x); returns (b, a). b is the gain per 10x data.

    Every (x, y) point counts (so several seeds per x weigh as they should). Needs at least
    two distinct x values.
    """
    pts = [(math.log10(float(x)), float(y)) for x, y in zip(xs, ys) if y is not None and not _isnan(y)]
    if len({p[0] for p in pts}) < 2:
        raise ValueError("fit_log_slope needs points at two or more distinct x values")
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in pts)
    slope = sxy / sxx
    return slope, my - slope * mx


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _num(v) -> Optional[float]:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for k in list(row):
            if k not in ("arm",):
                row[k] = _num(row[k])
        for k in ("data_size", "seed", "steps"):
            if row.get(k) is not None:
                row[k] = int(row[k])
    return rows


def write_csv(results: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: _fmt_csv(r.get(k)) for k in COLUMNS})


def _fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _ordered_arms(results: Sequence[dict], arm_order: Optional[Sequence[str]]) -> List[str]:
    present = []
    for r in results:
        if r["arm"] not in present:
            present.append(r["arm"])
    if arm_order:
        return [a for a in arm_order if a in present] + [a for a in present if a not in arm_order]
    return present


def summarize(results: Sequence[dict], metric: str, arm_order=None) -> Dict[str, Dict[int, Tuple[float, float, int]]]:
    """{arm: {data_size: (mean, std over seeds (0 for one seed), n)}} for ``metric``."""
    out: Dict[str, Dict[int, Tuple[float, float, int]]] = {}
    for arm in _ordered_arms(results, arm_order):
        by_size: Dict[int, List[float]] = {}
        for r in results:
            v = _num(r.get(metric))
            if r["arm"] == arm and v is not None:
                by_size.setdefault(int(r["data_size"]), []).append(v)
        out[arm] = {n: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for n, v in sorted(by_size.items())}
    return out


def slopes(results: Sequence[dict], metric: str = "answer_accuracy", arm_order=None) -> Dict[str, Optional[float]]:
    out = {}
    for arm in _ordered_arms(results, arm_order):
        pts = [(r["data_size"], _num(r.get(metric))) for r in results if r["arm"] == arm]
        pts = [(x, y) for x, y in pts if y is not None]
        try:
            out[arm] = fit_log_slope([p[0] for p in pts], [p[1] for p in pts])[0]
        except ValueError:
            out[arm] = None
    return out


def _data_size_axis(ax, results: Sequence[dict]) -> None:
    """The x axis of every plot: data size on a log scale, ticked at the sizes run."""
    ax.set_xscale("log")
    sizes = sorted({int(r["data_size"]) for r in results})
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("data size N (unique training samples)")


def plot_metric(results: Sequence[dict], metric: str, path: str, *, labels=None, arm_order=None,
                title: Optional[str] = None, chance: Optional[float] = None) -> None:
    """``metric`` against data size (log x): per arm the seed mean, a band of +-1 std, the
    individual seeds as dots, and the fitted slope per 10x data in the legend."""
    # Lazy: choosing the Agg backend is process-wide, so it happens only when a plot is drawn
    # (matplotlib is needed for the plots alone).
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    summary = summarize(results, metric, arm_order)
    fitted = slopes(results, metric, arm_order)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for arm, by_size in summary.items():
        if not by_size:
            continue
        xs = sorted(by_size)
        mean = [by_size[x][0] for x in xs]
        std = [by_size[x][1] for x in xs]
        slope = fitted.get(arm)
        label = labels.get(arm, arm) + (f"  (slope {slope:+.3f}/10x)" if slope is not None else "")
        line, = ax.plot(xs, mean, marker="o", label=label)
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
        pts = [(r["data_size"], _num(r.get(metric))) for r in results if r["arm"] == arm]
        pts = [p for p in pts if p[1] is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=line.get_color(), s=10, alpha=0.5)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.3f})")
    _data_size_axis(ax, results)
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    n_seeds = len({r["seed"] for r in results})
    ax.set_title(title or f"{METRIC_LABELS.get(metric, metric)} vs data size "
                          f"(mean, band = +-1 std over {n_seeds} seed(s))", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paired(results: Sequence[dict], metric: str, path: str, *, baseline: str = "und_only",
                labels=None, arm_order=None) -> bool:
    """``metric`` minus the baseline's (same size and seed) against data size (log x): per arm
    the mean over seeds and a band of +-1 std; the question of the paper's Fig. 4 (does the
    gap close or turn as data grows?) read directly. False when there is nothing to pair."""
    diffs = paired_differences(results, metric, baseline, arm_order)
    if not any(diffs.values()):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    colour = {arm: f"C{i % 10}" for i, arm in enumerate(_ordered_arms(results, arm_order))}  # as plot_metric's
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for arm, by_size in diffs.items():
        if not by_size:
            continue
        xs = sorted(by_size)
        mean = [by_size[x][0] for x in xs]
        std = [by_size[x][1] for x in xs]
        line, = ax.plot(xs, mean, marker="o", color=colour[arm], label=labels.get(arm, arm))
        ax.fill_between(xs, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=line.get_color(), alpha=0.12, linewidth=0)
    ax.axhline(0.0, color="black", linewidth=1)
    _data_size_axis(ax, results)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} minus {labels.get(baseline, baseline)}")
    ax.set_title(f"paired with {labels.get(baseline, baseline)}, same seed (mean, band = +-1 std over seeds)",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _cell(mean_std_n) -> str:
    if mean_std_n is None:
        return "-"
    m, s, n = mean_std_n
    return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def markdown_tables(results: Sequence[dict], labels=None, arm_order=None) -> str:
    labels = labels or {}
    sizes = sorted({int(r["data_size"]) for r in results})
    lines = []
    for metric in ("answer_accuracy", "caption_perplexity", "probe_mean", "retrieval_top1", "retrieval_r2",
                   "final_semantic_r2", "final_pixel_r2", "final_text"):
        summary = summarize(results, metric, arm_order)
        if not any(summary.values()):
            continue
        sl = slopes(results, metric, arm_order) if len(sizes) > 1 else {}
        lines.append(f"**{METRIC_LABELS.get(metric, metric)}** (mean ± std over seeds)\n")
        head = "| arm | " + " | ".join(f"N={n}" for n in sizes) + (" | slope per 10x |" if sl else " |")
        lines.append(head)
        lines.append("|" + "---|" * (len(sizes) + 1 + (1 if sl else 0)))
        for arm, by_size in summary.items():
            if not by_size:
                continue
            cells = [_cell(by_size.get(n)) for n in sizes]
            row = f"| {labels.get(arm, arm)} | " + " | ".join(cells)
            if sl:
                row += " | " + (f"{sl[arm]:+.3f}" if sl.get(arm) is not None else "-")
            lines.append(row + " |")
        lines.append("")
    return "\n".join(lines)


def _paired(results: Sequence[dict], metric: str, baseline: str) -> Dict[str, List[Tuple[int, int, float]]]:
    """{arm: [(data size, seed, metric minus the baseline's at that size and seed)]}, the
    baseline left out: what every paired figure below is computed from."""
    base = {(int(r["data_size"]), int(r["seed"])): _num(r.get(metric)) for r in results if r["arm"] == baseline}
    out: Dict[str, List[Tuple[int, int, float]]] = {}
    for r in results:
        key = (int(r["data_size"]), int(r["seed"]))
        v = _num(r.get(metric))
        if r["arm"] != baseline and v is not None and base.get(key) is not None:
            out.setdefault(r["arm"], []).append((key[0], key[1], v - base[key]))
    return out


def paired_differences(results: Sequence[dict], metric: str = "answer_accuracy", baseline: str = "und_only",
                       arm_order=None) -> Dict[str, Dict[int, Tuple[float, float, int]]]:
    """{arm: {size: (mean, std, n)}} of ``metric`` minus the baseline's at the same size and seed
    (same seed = same initialisation and data order), over the seeds both have."""
    paired = _paired(results, metric, baseline)
    out: Dict[str, Dict[int, Tuple[float, float, int]]] = {}
    for arm in _ordered_arms(results, arm_order):
        if arm == baseline:
            continue
        by_size: Dict[int, List[float]] = {}
        for n, _, d in paired.get(arm, []):
            by_size.setdefault(n, []).append(d)
        out[arm] = {n: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for n, v in sorted(by_size.items())}
    return out


def paired_table(results: Sequence[dict], metric: str = "answer_accuracy", baseline: str = "und_only",
                 labels=None, arm_order=None) -> str:
    labels = labels or {}
    diffs = paired_differences(results, metric, baseline, arm_order)
    if not any(diffs.values()):
        return ""
    sizes = sorted({int(r["data_size"]) for r in results})
    lines = [f"**{METRIC_LABELS.get(metric, metric)} minus {labels.get(baseline, baseline)}, same seed** "
             f"(mean ± std over seeds of the paired difference)\n",
             "| arm | " + " | ".join(f"N={n}" for n in sizes) + " |", "|" + "---|" * (len(sizes) + 1)]
    for arm, by_size in diffs.items():
        cells = []
        for n in sizes:
            if n not in by_size:
                cells.append("-")
            else:
                m, sd, k = by_size[n]
                cells.append(f"{m:+.3f} ± {sd:.3f}" if k > 1 else f"{m:+.3f}")
        lines.append(f"| {labels.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Two-sided 95 % critical values of Student's t by degrees of freedom (seeds - 1): the slope
# test below runs on a handful of seeds, where 1.96 would overstate what they resolve.
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228}


def paired_slopes(results: Sequence[dict], metric: str = "answer_accuracy", baseline: str = "und_only",
                  sizes: Optional[Sequence[int]] = None, arm_order=None) -> Dict[str, List[float]]:
    """{arm: [one slope per seed]}: per seed, the least-squares slope per 10x data of
    ``metric`` minus the baseline's (same size, same seed), over ``sizes`` (default all).

    A positive slope says the arm gains on the baseline as data grows (the paper's Fig. 4:
    semantic generation "lower early, steeper later"). Fitting each seed's own difference
    curve removes what a seed shares across arms (initialisation, data order), and the spread
    of the per-seed slopes is the honest uncertainty of the difference.
    """
    keep = None if sizes is None else {int(n) for n in sizes}
    paired = _paired(results, metric, baseline)
    out: Dict[str, List[float]] = {}
    for arm in _ordered_arms(results, arm_order):
        by_seed: Dict[int, List[Tuple[int, float]]] = {}
        for n, seed, d in paired.get(arm, []):
            if keep is None or n in keep:
                by_seed.setdefault(seed, []).append((n, d))
        per_seed = [fit_log_slope([p[0] for p in pts], [p[1] for p in pts])[0]
                    for _, pts in sorted(by_seed.items()) if len({p[0] for p in pts}) >= 2]
        if per_seed:
            out[arm] = per_seed
    return out


def slope_verdict(per_seed: Sequence[float]) -> Tuple[float, float, Optional[float], str]:
    """(mean, std, t, verdict) of per-seed slope differences: "steeper" / "flatter" when the
    mean differs from 0 at 95 % (one-sample t over the seeds), else "not resolved"."""
    n = len(per_seed)
    mean = statistics.fmean(per_seed)
    if n < 2:
        return mean, 0.0, None, "one seed: not tested"
    std = statistics.stdev(per_seed)
    t = (math.copysign(math.inf, mean) if mean else 0.0) if std == 0 else mean / (std / math.sqrt(n))
    crit = T_CRIT_95.get(n - 1, 1.96)
    if t > crit:
        return mean, std, t, "steeper"
    if t < -crit:
        return mean, std, t, "flatter"
    return mean, std, t, "not resolved"


def slope_table(results: Sequence[dict], metric: str = "answer_accuracy", baseline: str = "und_only",
                labels=None, arm_order=None) -> str:
    """Per arm: its slope per 10x, and its slope minus the baseline's (per seed, mean ± std and
    the verdict) over all sizes and over the upper sizes (all but the smallest), where the
    paper's "steeper later" would show first."""
    labels = labels or {}
    sizes = sorted({int(r["data_size"]) for r in results})
    if len(sizes) < 2:
        return ""
    upper = sizes[1:] if len(sizes) >= 3 else None
    own = slopes(results, metric, arm_order)
    all_sizes = paired_slopes(results, metric, baseline, None, arm_order)
    upper_sizes = paired_slopes(results, metric, baseline, upper, arm_order) if upper else {}
    if not all_sizes:
        return ""

    def cell(per_seed):
        if not per_seed:
            return "-"
        mean, std, t, verdict = slope_verdict(per_seed)
        t_text = "" if t is None else (f", t={t:+.1f}" if math.isfinite(t) else "")
        return f"{mean:+.3f} ± {std:.3f} ({verdict}{t_text})"

    span = f"N={sizes[0]}-{sizes[-1]}"
    head = f"| arm | slope per 10x | minus {labels.get(baseline, baseline)}'s, {span} |"
    if upper:
        head += f" minus {labels.get(baseline, baseline)}'s, N={upper[0]}-{upper[-1]} |"
    lines = [f"**{METRIC_LABELS.get(metric, metric)}: slope per 10x data and its difference from "
             f"{labels.get(baseline, baseline)}'s** (per seed: the slope of the paired difference; "
             f"mean ± std over seeds; steeper / flatter = different from 0 at 95 %, one-sample t "
             f"over seeds)\n", head, "|" + "---|" * (3 + (1 if upper else 0))]
    for arm in _ordered_arms(results, arm_order):
        slope = own.get(arm)
        row = f"| {labels.get(arm, arm)} | " + (f"{slope:+.3f}" if slope is not None else "-")
        if arm == baseline:
            row += " | (baseline)" + (" | (baseline)" if upper else "")
        else:
            row += " | " + cell(all_sizes.get(arm)) + ((" | " + cell(upper_sizes.get(arm))) if upper else "")
        lines.append(row + " |")
    return "\n".join(lines) + "\n"


def per_run_table(results: Sequence[dict]) -> str:
    cols = ["arm", "data_size", "seed", "steps", "epochs", "answer_accuracy", "caption_perplexity",
            "probe_shape", "probe_colour", "probe_position", "probe_size", "retrieval_top1",
            "retrieval_top5", "retrieval_r2", "final_loss", "final_text", "final_semantic",
            "final_semantic_r2", "final_pixel", "final_pixel_r2", "final_embed_norm_visual", "wall_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            if v is None or v == "":
                cells.append("-")
            elif isinstance(v, float):
                cells.append(f"{v:.1f}" if c in ("wall_s",) else f"{v:.3f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: Sequence[dict], out_dir: str, *, labels=None, arm_order=None,
                  header: str = "", notes: str = "", chance: Optional[float] = None) -> Dict[str, str]:
    """results.csv, results.md, understanding.png (+ metrics.png) in ``out_dir``; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    results = sorted(results, key=lambda r: (
        list(arm_order).index(r["arm"]) if arm_order and r["arm"] in arm_order else 99,
        int(r["data_size"]), int(r["seed"])))
    paths = {"csv": os.path.join(out_dir, "results.csv"), "md": os.path.join(out_dir, "results.md"),
             "png": os.path.join(out_dir, "understanding.png")}
    write_csv(results, paths["csv"])
    plot_metric(results, "answer_accuracy", paths["png"], labels=labels, arm_order=arm_order, chance=chance)
    extra = []
    for metric in ("caption_perplexity", "probe_mean", "retrieval_top1", "retrieval_r2", "final_semantic_r2"):
        if any(_num(r.get(metric)) is not None for r in results) and len({r["data_size"] for r in results}) > 0:
            p = os.path.join(out_dir, f"{metric}.png")
            plot_metric(results, metric, p, labels=labels, arm_order=arm_order)
            paths[metric] = p
            extra.append(p)
    md = ["# UniHetero objective ablation (CPU scale)", ""]
    if header:
        md += [header.rstrip(), ""]
    if notes:
        md += [notes.rstrip(), ""]
    md += ["## Summary tables", "", markdown_tables(results, labels, arm_order), "",
           "## Against und-only, same seed", ""]
    for metric in ("answer_accuracy", "caption_perplexity", "probe_mean"):
        md += [paired_table(results, metric, labels=labels, arm_order=arm_order), ""]
    md += [slope_table(results, labels=labels, arm_order=arm_order), ""]
    paired_png = os.path.join(out_dir, "understanding_vs_und_only.png")
    if plot_paired(results, "answer_accuracy", paired_png, labels=labels, arm_order=arm_order):
        paths["paired_png"] = paired_png
        md += ["![understanding minus und-only](understanding_vs_und_only.png)", ""]
    md += ["![understanding](understanding.png)", ""]
    md += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})" for p in extra]
    md += ["", "## Every run", "", per_run_table(results), ""]
    with open(paths["md"], "w") as handle:
        handle.write("\n".join(md))
    return paths
