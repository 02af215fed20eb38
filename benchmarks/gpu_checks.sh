#!/usr/bin/env bash
# The GPU checks of the scale-and-speed work, as one script for a session that has the GPU
# machine (the `device` tool: 15 minutes of device time, all tries together). Run from the
# repository root; everything it prints also goes to $OUT/log.txt.
#
#   1. DiT-XL/2 at 256 px (32x32x4 latents), bf16: images/s, step time, peak memory and MFU at
#      growing batches until one does not fit, without and then with --grad-checkpoint;
#   2. the best batch without checkpointing again with --compile;
#   3. our step against diffusers' DiTTransformer2DModel (bench_peer.py; needs diffusers, see below);
#   4. the CUDA path of the trainer (pinned, prefetched batches), a resume, and sampling;
#   5. the CUDA-only test.
#
# The machine's python3 has torch, numpy, safetensors, scikit-learn, pillow, tqdm and
# tensorboard but not diffusers. To have steps 3 and 5, first download wheels here, in the
# repository root (the folder is ignored by git and named in the run's `carry`):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl diffusers importlib_metadata
# then: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=600).
#
# Knobs (environment): MODEL, INPUT, BATCHES, CKPT_BATCHES, STEPS, WARMUP, PY. A dry run on a
# CPU with a small model checks the script itself:
#   MODEL=DiT-S/8 BATCHES="2 4" CKPT_BATCHES="4" STEPS=1 WARMUP=1 TRAIN_STEPS=20 bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
MODEL=${MODEL:-DiT-XL/2}
INPUT=${INPUT:-32}
BATCHES=${BATCHES:-"128 256 384 512 640 768 1024"}
CKPT_BATCHES=${CKPT_BATCHES:-"1024 1536 2048 3072 4096"}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
TRAIN_STEPS=${TRAIN_STEPS:-300}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log() { echo "$@" | tee -a "$OUT/log.txt"; }
run() { log "\$ $*"; "$@" 2>&1 | grep -v -i warning | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }
bench() { run timeout 300 $PY -m ditforge bench --model "$MODEL" --input-size "$INPUT" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" "$@"; }

log "# $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
log "# $($PY -c 'import torch; print("torch", torch.__version__)')"

log "## 1. largest batch without, then with, gradient checkpointing"
best=""
for b in $BATCHES; do bench --batch "$b" || break; best=$b; done
for b in $CKPT_BATCHES; do bench --batch "$b" --grad-checkpoint || break; done

log "## 2. compile at the largest batch that fitted (${best:-none})"
[ -n "$best" ] && bench --batch "$best" --compile

log "## 3. against the peer"
if $PY -c "import diffusers" 2> /dev/null; then
    run timeout 400 $PY benchmarks/bench_peer.py --model "$MODEL" --input-size "$INPUT" --batch 64 --precision bf16 --steps "$STEPS" --warmup "$WARMUP" --rounds 1
else
    log "diffusers is not installed here: skipped (see the top of this script)"
fi

log "## 4. the trainer on this device: prefetched batches, resume, sampling"
rm -rf /tmp/gpu_checks_run
run timeout 300 $PY -m ditforge train --preset tiny --steps "$((TRAIN_STEPS / 2))" --run-dir /tmp/gpu_checks_run --no-progress
run timeout 300 $PY -m ditforge train --run-dir /tmp/gpu_checks_run --steps "$TRAIN_STEPS" --no-progress
run timeout 300 $PY -m ditforge sample /tmp/gpu_checks_run --out "$OUT/grid.png"

log "## 5. the CUDA-only test"
run timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_latents.py -k cuda
log "# done"
