#!/usr/bin/env bash
# Image generation end to end on a CPU machine, at the quickstart's scale: the shapes-world
# data also written as text-to-image samples (caption, then image: the layout image generation
# learns from; the quickstart's caption samples put the image first), a tokenizer, shards, a
# tiny UniHetero trained with the semantic head AND the pixel head (hetero routing) with
# classifier-free guidance's condition dropout, then tools/generate_image.py writes PNGs,
# unguided and guided. Any failing step fails the script.
#   bash examples/generate_images_cpu.sh        (about 8 minutes on 2 cores)
# Environment: STEPS (default 300), WORK (default runs/imagegen: data, run and images),
# INSTALL=0 to skip tools/install.sh.
# What to expect: the pixel head decodes through the VAE of model.pixel (vae_path: a local
# diffusers AutoencoderKL folder; without one, as here, a small randomly initialised, frozen
# VAE): the PNGs show the pipeline works, not pictures, until a trained VAE is given.
# prediction=v: DDIM's first step is at alpha-bar 2.4e-9 (cosine schedule, trailing spacing),
# where an epsilon head's error is multiplied by 1/sqrt(alpha-bar) ~ 2e4 on the way to the
# clean latent; after 300 steps that gives latents of std ~2000 (v: ~0.09, pixel_r2 0.25 vs 0).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
WORK=${WORK:-runs/imagegen}
DATA="$WORK/data"
RUN="$WORK/run"

if [ "${INSTALL:-1}" != "0" ]; then
  bash tools/install.sh
fi

mkdir -p "$DATA" "$WORK/images"
if [ ! -f "$DATA/train.parquet" ]; then
  python tools/make_demo_data.py --output "$DATA" --num-samples 4000 --seed 0 --image-size 32
fi
if [ ! -f "$DATA/t2i.parquet" ]; then
  # The same rows as interleaved segments: [caption text, image] (preprocess --interleaved-column).
  python - "$DATA" <<'EOF'
import sys
import pyarrow as pa
import pyarrow.parquet as pq
folder = sys.argv[1]
rows = pq.read_table(f"{folder}/train.parquet", columns=["image", "caption"]).to_pylist()
segment = pa.struct([("text", pa.string()), ("image", pa.binary())])
segments = [[{"text": r["caption"], "image": None}, {"text": None, "image": r["image"]}] for r in rows]
pq.write_table(pa.table({"segments": pa.array(segments, type=pa.list_(segment))}), f"{folder}/t2i.parquet")
EOF
fi
if [ ! -f "$DATA/tokenizer.model" ]; then
  python tools/train_tokenizer.py --input "$DATA/train.parquet" --vocab-size 512 --output "$DATA/tokenizer.model"
fi
if [ ! -f "$DATA/train_00000.json" ]; then
  python tools/preprocess_data.py --input "$DATA/train.parquet" --output-prefix "$DATA/train" \
    --tokenizer-model "$DATA/tokenizer.model" --template both --image-size 32 --workers 2 --no-progress
fi
if [ ! -f "$DATA/t2i_00000.json" ]; then
  python tools/preprocess_data.py --input "$DATA/t2i.parquet" --output-prefix "$DATA/t2i" \
    --tokenizer-model "$DATA/tokenizer.model" --interleaved-column segments --image-size 32 \
    --workers 2 --no-progress
fi
# The null condition is the tokenizer's <pad> (tools/train_tokenizer.py: id 3).
PAD_ID=$(python -c "from megatron_unihetero.data.tokenizer import build_tokenizer as b; print(b('$DATA/tokenizer.model').pad_id)")

python -m megatron_unihetero.pretrain --config examples/configs/tiny_cpu.yaml \
  --data.train="[$DATA/t2i, $DATA/train]" --data.weights="[0.7, 0.3]" \
  --data.tokenizer="$DATA/tokenizer.model" \
  --model.pixel.weight=1.0 --model.pixel.routing=hetero --model.pixel.denoiser_width=128 \
  --model.pixel.num_sampling_steps=25 --model.pixel.prediction=v \
  --model.pixel.cond_dropout=0.1 --model.pixel.null_token_id="$PAD_ID" \
  --logging.eval_sets="[]" --train.steps="$STEPS" \
  --checkpoint.dir="$RUN/checkpoints" --logging.dir="$RUN"

for SCALE in 1 3; do
  mkdir -p "$WORK/images/cfg$SCALE"
  python tools/generate_image.py --load "$RUN/checkpoints" --cfg-scale "$SCALE" \
    --prompt "a large red circle in the center" --prompt "a small blue square at the top left" \
    --prompt "a large green triangle at the bottom" --out "$WORK/images/cfg$SCALE"
done
echo "images: $WORK/images/cfg1 (unguided), $WORK/images/cfg3 (guided, scale 3)"
