# The quick first MeanFlow measurement of 2026-12-02 (README "Measured", MeanFlow): bench, equal-time
# MeanFlow run, 1 seed of evals; benchmarks/meanflow_vs_flow.py is the full protocol (guided, 2 seeds).
cd "$(dirname "$0")/.."
O=runs/meanflow-digits
B="--data digits --model DiT-Ti/2 --batch-size 128 --precision fp32 --no-progress --norm rms --mlp swiglu --rope --qk-norm"
for o in flow meanflow; do .venv/bin/ditforge bench --model DiT-Ti/2 --input-size 8 --channels 1 --batch 128 --precision fp32 --objective $o --norm rms --mlp swiglu --rope --qk-norm --json $O/bench-$o.json | tail -1; done
S=$(python3 -c "import json;a=json.load(open('$O/bench-flow.json'))['step_ms'];b=json.load(open('$O/bench-meanflow.json'))['step_ms'];print(round(400*a/b))")
echo "meanflow steps $S"
t0=$(date +%s); .venv/bin/ditforge train --run-dir $O/meanflow $B --objective meanflow --steps $S --ckpt-every $S | tail -1; echo "meanflow train $(( $(date +%s)-t0 )) s"
.venv/bin/ditforge eval $O/flow --steps 20 --sampler ab2 --cfg 1 --json $O/e-flow-ab2-20.json | tail -1
.venv/bin/ditforge eval $O/meanflow --steps 1 --cfg 1 --json $O/e-mf-1.json | tail -1
.venv/bin/ditforge eval $O/meanflow --steps 2 --cfg 1 --json $O/e-mf-2.json | tail -1
t0=$(date +%s); .venv/bin/ditforge train --run-dir $O/finetune $B --objective meanflow --init-from $O/flow --steps 200 --ckpt-every 200 | tail -1; echo "finetune train $(( $(date +%s)-t0 )) s"
.venv/bin/ditforge eval $O/finetune --steps 1 --cfg 1 --json $O/e-ft-1.json | tail -1
