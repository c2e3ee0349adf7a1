"""The run's own understanding figures after the run: the curve (tools/plot_understanding.py),
the quickstart's summary, and the quickstart failing when its evaluation fails. (Scoring inside
the run, against evaluate.py, is tests/training/test_trainer.py: the DP=2 run and the
TP=2 x PP=2 run.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_unihetero.eval import curves

REPO = Path(__file__).resolve().parents[2]


def _write_run(run_dir: Path, accuracies, chance=0.25, generated=False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as handle:
        handle.write(json.dumps({"step": 1, "kind": "train", "loss": 3.0}) + "\n")
        for i, acc in enumerate(accuracies):
            record = {"step": 50 * i, "kind": "understanding", "samples_seen": 400 * i,
                      "shapes/accuracy": acc, "shapes/chance_accuracy": chance,
                      "shapes/answer_logprob": -3.0 + i, "shapes/num_questions": 200}
            if generated:
                record["shapes/exact_match"] = acc / 2
            handle.write(json.dumps(record) + "\n")
    return run_dir


def test_plot_tool_writes_a_png_of_several_runs(tmp_path):
    a = _write_run(tmp_path / "und_only", [0.25, 0.4, 0.6], generated=True)
    b = _write_run(tmp_path / "semantic", [0.25, 0.5, 0.7])
    out = tmp_path / "fig" / "curve.png"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "plot_understanding.py"), str(a), str(b),
                           "--output", str(out), "--labels", "und-only,+semantic"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    # A run that never evaluated its held-out sets is an error, not an empty figure.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "kind": "train"}) + "\n")
    with pytest.raises(ValueError, match="no understanding records"):
        curves.plot_understanding([str(empty)], str(tmp_path / "none.png"))


def test_summary_puts_each_figure_beside_its_chance(tmp_path):
    run = _write_run(tmp_path / "run", [0.25, 0.31, 0.72], generated=True)
    lines = curves.summary_lines(str(run), {"semantic_retrieval": {"top1": 0.4, "chance": 0.0625}})
    text = "\n".join(lines)
    assert lines[0] == "understanding at step 100 (800 samples seen):"
    assert "answer accuracy 0.720 (chance 0.250, 0.250 at step 0; 200 questions" in text
    assert "exact match 0.360" in text and "top-1 0.400 (chance 0.062" in text
    assert lines[-1].startswith("  meaning: the model picks the right answer clearly more often")
    # Within two standard errors of guessing (0.25 +- 2 x 0.031 on 200 questions): not claimed.
    near = _write_run(tmp_path / "near", [0.25, 0.30])
    assert "not clearly above chance" in curves.summary_lines(str(near))[-1]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no understanding record"):
        curves.summary_lines(str(empty))


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("failing", [None, "megatron_unihetero.evaluate", "plot_understanding.py"])
def test_quickstart_fails_when_its_evaluation_fails(tmp_path, failing):
    """examples/quickstart_cpu.sh with a stand-in ``python`` (each step succeeds at once, or
    the named one fails): a failed evaluation or summary fails the script, naming it."""
    data, run, bin_dir = tmp_path / "data", tmp_path / "run", tmp_path / "bin"
    data.mkdir()
    for name in ("train.parquet", "tokenizer.model", "train_00000.json"):
        (data / name).write_text("")
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(f"""#!/usr/bin/env bash
echo "python $*" >> "{tmp_path}/calls.log"
case "$*" in
  *megatron_unihetero.pretrain*) mkdir -p "{run}/checkpoints"; echo iter_0000300 > "{run}/checkpoints/latest";;
esac
case "$*" in *{failing or "NOTHING"}*) exit 3;; esac
exit 0
""")
    stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", INSTALL="0", STEPS="5",
               DATA=str(data), RUN=str(run))
    proc = subprocess.run(["bash", str(REPO / "examples" / "quickstart_cpu.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    calls = (tmp_path / "calls.log").read_text()
    assert "--logging.eval_sets=[{name: shapes, path: " + str(data) + "/valid.parquet" in calls
    if failing is None:
        assert proc.returncode == 0, proc.stderr
        assert "plot_understanding.py" in calls and "--summary" in calls
    else:
        assert proc.returncode != 0, proc.stdout
        assert "checkpoint:" not in proc.stdout  # it stopped at the failure
    if failing == "megatron_unihetero.evaluate":
        assert "evaluation of" in proc.stderr and "failed" in proc.stderr
        assert "plot_understanding.py" not in calls
