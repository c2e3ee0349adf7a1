#!/usr/bin/env bash
# The main job on a fresh CPU machine: install, make the built-in shapes-world data, train a
# tokenizer, preprocess into indexed shards, pretrain a small UniHetero with semantic
# generation while evaluating its held-out split inside the run (answer accuracy against the
# samples seen: RUN/understanding.png), evaluate the last checkpoint, and end with a short
# summary of the figures beside their chance levels. Any failing step fails the script.
#   bash examples/quickstart_cpu.sh            (about 5 minutes on 2 cores)
# Environment: STEPS (default 300), DATA (default data/shapes), RUN (default runs/quickstart),
# INSTALL=0 to skip tools/install.sh (an environment that already has the package).
# The console shows this package's lines only; the libraries' warnings go to $RUN/run.log,
# $DATA/train.log and $RUN/eval_metrics.log (--logging.verbose=true / --verbose: the console too).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
DATA=${DATA:-data/shapes}
RUN=${RUN:-runs/quickstart}

if [ "${INSTALL:-1}" != "0" ]; then
  bash tools/install.sh
fi

mkdir -p "$DATA"
if [ ! -f "$DATA/train.parquet" ]; then
  python tools/make_demo_data.py --output "$DATA" --num-samples 4000 --seed 0 --image-size 32
fi
if [ ! -f "$DATA/tokenizer.model" ]; then
  python tools/train_tokenizer.py --input "$DATA/train.parquet" --vocab-size 512 --output "$DATA/tokenizer.model"
fi
if [ ! -f "$DATA/train_00000.json" ]; then
  python tools/preprocess_data.py --input "$DATA/train.parquet" --output-prefix "$DATA/train" \
    --tokenizer-model "$DATA/tokenizer.model" --template both --image-size 32 --workers 2 --no-progress
fi

python -m megatron_unihetero.pretrain --config examples/configs/tiny_cpu.yaml \
  --data.train="[$DATA/train]" --data.tokenizer="$DATA/tokenizer.model" \
  --logging.eval_sets="[{name: shapes, path: $DATA/valid.parquet, max_rows: 200, generate: true, generate_rows: 50, max_new_tokens: 6}]" \
  --train.steps="$STEPS" --checkpoint.dir="$RUN/checkpoints" --logging.dir="$RUN"

# A failed evaluation fails the quickstart (set -e; no silent skip).
if ! python -m megatron_unihetero.evaluate --load "$RUN/checkpoints" --data "$DATA" \
    --tokenizer "$DATA/tokenizer.model" --max-samples 200 --output "$RUN/eval_metrics.json"; then
  echo "quickstart: evaluation of $RUN/checkpoints failed (see $RUN/eval_metrics.log)" >&2
  exit 1
fi

echo
python tools/plot_understanding.py "$RUN" --output "$RUN/understanding.png" --summary \
  --eval-metrics "$RUN/eval_metrics.json"
echo
echo "checkpoint: $RUN/checkpoints ($(cat "$RUN/checkpoints/latest"))"
echo "logs:       $RUN/metrics.jsonl, $RUN/run.log (library warnings), TensorBoard: tensorboard --logdir $RUN/tensorboard"
echo "metrics:    $RUN/eval_metrics.json; understanding curve: $RUN/understanding.png"
