#!/usr/bin/env bash
# The GPU checks, as one script for a session that has the GPU machine (the `device` tool).
# Budget: 8 minutes of device time with the machine's start-up, so about 5 minutes here; the
# most valuable first, each step under its own time limit, everything also in $OUT/log.txt.
#
#   1. the whole test suite on the GPU (pytest -n 8): CPU tests must pass there too, and the
#      `cuda` tests (bf16 default, pinned prefetch, NCCL with one process, the VAE) run;
#   2. the trainer's GPU path as a user runs it: train, resume, sample (bulk and grid), and
#      `torchrun --nproc_per_node 1`;
#   3. DiT-XL/2 at 256 px (4x32x32 latents), bf16 autocast, batch 256: ours eager and compiled,
#      with `--grad-checkpoint ops` at batch 256 and 512, against the official implementation's
#      model + loss and diffusers' DiTTransformer2DModel (each under bf16 autocast like ours;
#      eager and compiled): images/s, MFU, attention kernel, saved MB per image, compile time;
#   4. bulk sampling of DiT-XL/2 at 256 px, bf16, batch 64 (128 rows per guided forward), VAE decode excluded:
#      ours (`sample --out X.npz`'s path) with DDPM at 50 steps against the official
#      `sample_ddp.py` loop (`p_sample_loop` + `forward_with_cfg`, the same weights, fp32 as there
#      and under bf16 autocast), then ours with DPM-Solver++(2M) SDE at 20 steps
#      (`benchmarks/bench_sampling.py`): images/s and the ratios, also in $OUT/sampling.jsonl;
#      about a minute on an H100 (estimate), under two `timeout 120`.
#
# Bring along (the machine reaches no network; its python3 has torch, numpy, safetensors,
# scikit-learn, pillow, tqdm, tensorboard). In the repository root, before the run:
#   printf '/.whl/\n/.peers/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers huggingface_hub importlib_metadata zipp \
#       pytest pytest-xdist execnet pluggy iniconfig packaging timm
#   the official code: fetch github:facebookresearch/DiT (the search tool), then
#       mkdir -p .peers/DiT && git --git-dir <that mirror> archive HEAD models.py diffusion | tar -x -C .peers/DiT
# then: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl", ".peers"], timeout_s=420).
# (timm imports torchvision: where the machine has none, the official peer is reported as skipped.)
#
# Knobs (environment): MODEL, INPUT, BATCH, STEPS, WARMUP, TRAIN_STEPS, PYTEST_WORKERS, PY
# (section 4 takes MODEL and INPUT; its batch is SAMPLE_BATCH, 64, or BATCH when BATCH < 64).
# A dry run on a CPU checks the script itself (the suite step is skipped with SUITE=0):
#   SUITE=0 MODEL=DiT-S/8 INPUT=16 BATCH=2 STEPS=1 WARMUP=1 TRAIN_STEPS=20 bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
MODEL=${MODEL:-DiT-XL/2}
INPUT=${INPUT:-32}
BATCH=${BATCH:-256}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
TRAIN_STEPS=${TRAIN_STEPS:-200}
SUITE=${SUITE:-1}
PYTEST_WORKERS=${PYTEST_WORKERS:-8}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log() { echo "$@" | tee -a "$OUT/log.txt"; }
run() { log "\$ $*"; "$@" 2>&1 | grep -v -i warning | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }
T0=$(date +%s)
elapsed() { log "# $(( $(date +%s) - T0 )) s so far"; }

log "# $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
log "# $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

log "## 1. the test suite on this machine"
if [ "$SUITE" = 1 ]; then
    run timeout 150 $PY -m pytest -q -x -n "$PYTEST_WORKERS" -p no:cacheprovider tests -k "not killed and not sigkill" \
        || log "suite: failures above (or pytest-xdist missing: see the header)"
fi
elapsed

log "## 2. the trainer's GPU path: train, resume, sample, torchrun"
R=/tmp/gpu_checks_run
rm -rf "$R" "$R-ddp"
run timeout 90 $PY -m ditforge train --steps "$((TRAIN_STEPS / 2))" --run-dir "$R" --no-progress
run timeout 60 $PY -m ditforge train --steps "$TRAIN_STEPS" --run-dir "$R" --no-progress
run timeout 60 $PY -m ditforge sample "$R" --steps 50 --out "$OUT/grid.png"
run timeout 60 $PY -m ditforge sample "$R" --steps 50 --num-samples 1000 --batch-size 250 --shard-size 500 --out /tmp/gpu_checks.npz
run timeout 60 $PY -m ditforge eval "$R" --per-class 20
run timeout 90 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m ditforge train --steps 20 --run-dir "$R-ddp" --no-progress
elapsed

log "## 3. $MODEL bf16 at batch $BATCH: ours against the official DiT and diffusers, eager and compiled"
bench() { run timeout 150 $PY -m ditforge bench --model "$MODEL" --input-size "$INPUT" --batch "$BATCH" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" "$@"; }
bench
bench --compile
bench --grad-checkpoint ops                            # no matrix product twice, half the saved activations
bench --grad-checkpoint ops --batch "$((BATCH * 2))"   # twice the batch in the same memory?
peer() {
    run timeout 200 $PY benchmarks/bench_peer.py --model "$MODEL" --input-size "$INPUT" --batch "$BATCH" --precision bf16 \
        --peer-precision bf16 --peer-compile --no-malloc-row --steps "$STEPS" --warmup "$WARMUP" --rounds 1 "$@"
}
if [ -f .peers/DiT/models.py ] && $PY -c "import timm" 2> /dev/null; then
    peer --peer official --official .peers/DiT
else
    log "official peer skipped: needs .peers/DiT and timm (see the header)"
fi
if $PY -c "import diffusers" 2> /dev/null; then
    peer --peer diffusers
else
    log "diffusers peer skipped: not installed here (see the header)"
fi
elapsed

SAMPLE_BATCH=${SAMPLE_BATCH:-$(( BATCH < 64 ? BATCH : 64 ))}
log "## 4. bulk sampling of $MODEL bf16 at batch $SAMPLE_BATCH: ours against the official sample_ddp.py loop"
sampling() {
    run timeout 120 $PY benchmarks/bench_sampling.py --model "$MODEL" --input-size "$INPUT" --batch "$SAMPLE_BATCH" \
        --precision bf16 --batches 1 --warmup 1 --rounds 1 --official .peers/DiT --out-jsonl "$OUT/sampling.jsonl" "$@"
}
sampling --steps 50                                    # DDPM on both sides (the peer skipped without timm or .peers/DiT)
sampling --steps 20 --sampler dpm++2m-sde --peer none  # ours only: the official code has no such solver
elapsed
log "# done"
