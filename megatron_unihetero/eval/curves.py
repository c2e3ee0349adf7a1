"""Understanding against the data seen, from runs' own metrics.jsonl (the paper's Fig. 4).

The trainer writes an ``understanding`` record at every ``logging.eval_interval`` (eval/
understanding.py): ``samples_seen`` and per held-out set ``SET/accuracy``,
``SET/chance_accuracy``, ``SET/answer_logprob`` and, with generation, ``SET/exact_match``.
:func:`plot_understanding` draws the accuracy of every set of every run against samples seen
(or step), each set's chance level dashed; :func:`summary_lines` is the short readable summary
the CPU quickstart ends with. ``tools/plot_understanding.py`` is the command.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence


def read_understanding(run_dir: str) -> List[dict]:
    """The run's ``understanding`` records from its metrics.jsonl, in order (a resumed run's
    later records replace those of the same step)."""
    by_step: Dict[int, dict] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            if record.get("kind") == "understanding":
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


def set_names(records: Sequence[dict]) -> List[str]:
    """The held-out sets named in ``records`` (``SET/accuracy`` or ``SET/exact_match``), in order."""
    names: List[str] = []
    for record in records:
        for key in record:
            name, _, figure = key.rpartition("/")
            if name and figure in ("accuracy", "exact_match") and name not in names:
                names.append(name)
    return names


def plot_understanding(run_dirs: Sequence[str], output: str, *, x: str = "samples_seen",
                       labels: Optional[Sequence[str]] = None, title: Optional[str] = None) -> str:
    """A PNG of answer accuracy (likelihood; and generated answers' exact match where logged)
    against ``x`` (``samples_seen`` or ``step``), one line per run and set, with each set's
    chance accuracy dashed. Returns ``output``; ValueError when no run has a record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("samples_seen", "step"):
        raise ValueError(f"x must be samples_seen or step, got {x!r}")
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn, chance_drawn = 0, set()
    for run_dir, label in zip(run_dirs, labels):
        records = read_understanding(run_dir)
        for name in set_names(records):
            for figure, style in (("accuracy", "-o"), ("exact_match", ":s")):
                points = [(r.get(x, r["step"]), r[f"{name}/{figure}"]) for r in records
                          if f"{name}/{figure}" in r]
                if not points:
                    continue
                xs, ys = zip(*points)
                what = "accuracy" if figure == "accuracy" else "exact match (generated)"
                ax.plot(xs, ys, style, markersize=3, label=f"{label}: {name} {what}")
                drawn += 1
            chance = [r[f"{name}/chance_accuracy"] for r in records if f"{name}/chance_accuracy" in r]
            if chance and name not in chance_drawn:
                ax.axhline(chance[-1], linestyle="--", color="grey", linewidth=1)
                ax.annotate(f"{name} chance {chance[-1]:.2f}", (0.01, chance[-1]), xycoords=("axes fraction", "data"),
                            fontsize=7, color="grey", va="bottom")
                chance_drawn.add(name)
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no understanding records in {list(run_dirs)} (metrics.jsonl): was "
                         "logging.eval_sets set and logging.eval_interval reached?")
    ax.set_xlabel("samples seen" if x == "samples_seen" else "step")
    ax.set_ylabel("answer accuracy (held-out)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Understanding against the data seen")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def summary_lines(run_dir: str, eval_metrics: Optional[Dict[str, object]] = None) -> List[str]:
    """A few lines a person reads at the end of a run: each held-out figure of the run's last
    understanding record beside its chance level (and the first record's, to see the change),
    then ``evaluate.py``'s retrieval figure beside its chance when ``eval_metrics`` is given,
    and one line on what they mean. ValueError when the run has no understanding record."""
    records = read_understanding(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no understanding record: the run did not "
                         "evaluate its held-out sets (logging.eval_sets, logging.eval_interval)")
    first, last = records[0], records[-1]
    lines = [f"understanding at step {last['step']} ({int(last.get('samples_seen', 0))} samples seen):"]
    above = []
    for name in set_names(records):
        if f"{name}/accuracy" in last:
            acc, chance = last[f"{name}/accuracy"], last[f"{name}/chance_accuracy"]
            start = first.get(f"{name}/accuracy")
            trend = f", {_fmt(start)} at step {first['step']}" if len(records) > 1 and start is not None else ""
            n = int(last.get(f"{name}/num_questions", 0))
            lines.append(f"  {name}: answer accuracy {_fmt(acc)} (chance {_fmt(chance)}{trend}; "
                         f"{n} questions, by likelihood)")
            # Above chance when beyond two standard errors of a guesser's accuracy on n questions.
            above.append(n > 0 and acc > chance + 2 * math.sqrt(chance * (1 - chance) / n))
        if f"{name}/exact_match" in last:
            lines.append(f"  {name}: generated answers' exact match {_fmt(last[f'{name}/exact_match'])} "
                         f"(chance ~0: the answer must be written out)")
    retrieval = (eval_metrics or {}).get("semantic_retrieval")
    if isinstance(retrieval, dict) and "top1" in retrieval:
        lines.append(f"  next visual embedding retrieval top-1 {_fmt(retrieval['top1'])} "
                     f"(chance {_fmt(retrieval.get('chance'))}; evaluate.py)")
    if above and all(above):
        meaning = ("the model picks the right answer clearly more often than guessing (beyond two "
                   "standard errors of a guesser); answer priors may be part of it, the curve shows the trend")
    elif above and any(above):
        meaning = "clearly above chance on some sets only: more steps or data should lift the others"
    else:
        meaning = ("not clearly above chance (within two standard errors of guessing): too few "
                   "steps or questions to tell; train longer or score more rows (max_rows)")
    lines.append(f"  meaning: {meaning}")
    return lines
