#!/usr/bin/env bash
# FID (Inception-v3, ADM definitions) of a digits run against the 359 held-out real digits, at
# guidance 1.0, 1.5 and 4.0, next to 500 real training digits against the same reference.
#   bash benchmarks/fid_digits.sh [RUN] [OUT]      (from the repository root; defaults below)
#   CFGS="1.5" PRECISION=bf16 bash benchmarks/fid_digits.sh RUN OUT   (other scales; the network in bf16)
#   SAMPLER=dpm++2m-sde bash benchmarks/fid_digits.sh RUN    (default ddpm, as its recorded figures: 50 DDPM steps)
set -e
CFGS=${CFGS:-"1.0 1.5 4.0"}
PRECISION=${PRECISION:-auto}
SAMPLER=${SAMPLER:-ddpm}
RUN=${1:-runs/digits}
export OUT=${2:-runs/fid-digits}
mkdir -p "$OUT"
B=.venv/bin
$B/python - <<'PY'
import os
import numpy as np, torch
from ditforge.data.sources import load_data, to_uint8
out = os.environ["OUT"]
def npz(images, path):
    pix = to_uint8(images).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()  # (N, 8, 8, 3) uint8
    np.savez(path, arr_0=pix)
held = load_data("digits", "heldout")
npz(held.images, f"{out}/heldout.npz")
train = load_data("digits", "train")
idx = torch.cat([torch.nonzero(train.labels == c)[:50, 0] for c in range(10)])
npz(train.images[idx], f"{out}/train500.npz")
PY
start=$(date +%s)
$B/ditforge eval --samples "$OUT/train500.npz" --ref "$OUT/heldout.npz" --save-ref "$OUT/ref.npz" --json "$OUT/real.json" 2>/dev/null | grep -v "%|"
echo "real vs held-out: $(( $(date +%s) - start )) s"
for c in $CFGS; do
  $B/ditforge sample "$RUN" --num-samples 500 --balanced --cfg $c --sampler $SAMPLER --steps 50 --batch-size 100 --shard-size 500 \
      --precision "$PRECISION" --out "$OUT/c$c.npz" 2>/dev/null | tail -1
  s=$(date +%s)
  $B/ditforge eval --samples "$OUT/c$c.npz" --ref "$OUT/ref.npz" --json "$OUT/c$c.json" 2>/dev/null | grep -v "%|"
  echo "eval: $(( $(date +%s) - s )) s"
done
