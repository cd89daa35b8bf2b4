#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md as one prepared run (for a machine lent for minutes).
#
#   On the GPU machine, from the repository root, with the wheels of tools/fetch_gpu_wheels.sh in .whl/:
#     OUT=/some/dir tools/gpu_check.sh            # everything lands in $OUT (logs + JSON)
#   Here, to check the script itself without a GPU (small sizes, CPU):
#     OUT=/tmp/gc DEVICE=cpu tools/gpu_check.sh
#
# Steps, each with its own time limit so one slow step cannot eat the others:
#   1. GPU parity tests (pytest -m gpu): gsplat vs the CPU rasterizer, training, strategy,
#      tracking, encoder and the compiled renderer on CUDA. The first gsplat call compiles its
#      CUDA code (~100 s on an H100).
#   2. `hravatar bench` at 512 px, eager and with --compile (fused deformation + shading).
#   3. the synthetic benchmark's `full` profile (512 px): dataset, training for at most
#      TRAIN_LIMIT seconds (iterations/s and the loss curve are in events.jsonl), evaluation if
#      it finished.
#   4. the app's own displayed-fps counter while the expression slider moves, on the demo avatar
#      relit by the built-in studio map (issue 4: 1,000 frames at 512 px), eager and with
#      --compile, in a window under Xvfb (skipped with a message where xvfb-run is missing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
DEVICE=${DEVICE:-cuda}
TRAIN_LIMIT=${TRAIN_LIMIT:-300}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=python3
if [ -x .venv/bin/python ] && [ "$DEVICE" = cpu ]; then py=.venv/bin/python; fi

if [ "$DEVICE" = cuda ] && compgen -G ".whl/*.whl" >/dev/null; then
  # no package index on the GPU machine: the wheels travel with the tree
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
hr=($py -m hravatar.cli.main)  # the CLI, run under `timeout` (which cannot run a shell function)
# torch.compile's warnings and their source excerpts, kept out of the logs
drop_compile_noise() { grep -v -i "warn\|originates\|^ *File\|\^\^\|^ *src, "; }

{ date -u; nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  2>&1 | tee "$OUT/machine.txt"

if [ "$DEVICE" = cuda ]; then
  echo "== 1. GPU parity tests"
  timeout 420 $py -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -40 | tee "$OUT/gpu_tests.log"
  G="20000 100000"; R="512"; REPS=50
else
  G="2000"; R="64"; REPS=3
fi

echo "== 2. renderer benchmark"
timeout 240 "${hr[@]}" bench --device $DEVICE --gaussians $G --res $R --reps $REPS --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
timeout 300 "${hr[@]}" bench --device $DEVICE --gaussians $G --res $R --reps $REPS --compile --json "$OUT/bench_compiled.json" 2>&1 \
  | drop_compile_noise | tee "$OUT/bench_compiled.log"

echo "== 3. synthetic benchmark, full profile"
data=/tmp/hravatar_synth
rm -rf "$data" /tmp/hravatar_run
if [ "$DEVICE" = cuda ]; then
  timeout 240 "${hr[@]}" synth $data --frames 300 --res 512 --device cuda 2>&1 | tail -3 | tee "$OUT/synth.log"
  targs=(--profile full --device cuda)
else
  timeout 240 "${hr[@]}" synth $data --frames 12 --res 64 --gaussians 20000 --device cpu 2>&1 | tail -3 | tee "$OUT/synth.log"
  targs=(--profile quick --device cpu --iterations 20 --resolution 64 --avatar-num-gaussians 2000)
fi
start=$(date +%s)
timeout "$TRAIN_LIMIT" "${hr[@]}" train "$data" --out /tmp/hravatar_run "${targs[@]}" --quiet 2>&1 | tail -5 | tee "$OUT/train.log"
echo "training wall time: $(( $(date +%s) - start )) s (limit $TRAIN_LIMIT s)" | tee -a "$OUT/train.log"
cp /tmp/hravatar_run/events.jsonl "$OUT/train_events.jsonl" 2>/dev/null
if [ -f /tmp/hravatar_run/avatar.safetensors ]; then
  timeout 200 "${hr[@]}" eval /tmp/hravatar_run --data "$data" --json "$OUT/eval.json" 2>&1 | tail -3 | tee "$OUT/eval.log"
fi

echo "== 4. app: displayed frames/s while a slider moves"
if [ "$DEVICE" = cuda ]; then AF=1000; AR=512; else AF=30; AR=64; fi
if command -v xvfb-run >/dev/null; then
  for mode in eager compiled; do
    extra=(); [ $mode = compiled ] && extra=(--compile)
    timeout 300 xvfb-run -a -s "-screen 0 1920x1200x24" $py launch.py --device $DEVICE --res $AR --envmap builtin:studio \
      --bench-frames $AF --bench-slider expression --no-progressive --bench-json "$OUT/app_bench_$mode.json" "${extra[@]}" 2>&1 \
      | drop_compile_noise | tail -5 | tee "$OUT/app_bench_$mode.log"
  done
else
  echo "xvfb-run not found: app benchmark skipped" | tee "$OUT/app_bench.log"
fi
ls -la "$OUT"
