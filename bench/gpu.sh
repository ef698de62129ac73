#!/usr/bin/env bash
# The GPU check, one script that ends within BUDGET_S seconds (default 420, so that it fits the
# first GPU lent for 15 minutes with time to start the machine and to rerun it): the 50m update
# eager and compiled first, then 12m, then CUDA graphs, the training loop (prefetched batches,
# latents sent back without blocking) and collection with the 50m policy. Every command runs
# under its own `timeout`, cut to what is left of the budget; a command that no longer fits is
# skipped and said so. Prints a markdown row per update run for bench/RESULTS.md (the JSON lines
# go to stderr).
#
#   bash bench/gpu.sh             # on a machine with a CUDA GPU
#   bash bench/gpu.sh --dry-run   # anywhere: tiny sizes on the CPU, eager only; the compiled
#                                 # runs are printed, not run
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
BUDGET_S=${BUDGET_S:-420}
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1; DEVICE=cpu; PRECISION=fp32
    SHAPE="--batch_size 2 --sequence_length 4 --horizon 2 --updates 1 --warmup_updates 1 --peak_size 256 --threads 1"
    ENV_ARGS="--num_envs 2 --steps 16 --policy tiny --threads 1"
    LOOP_ARGS="--model_size tiny --num_envs 2 --batch_size 2 --sequence_length 8 --learning_starts 32 --block 2 --blocks 1 --threads 1"
    RUNS="tiny:eager tiny:compiled tiny:cudagraphs"
else
    DRY=0; DEVICE=cuda; PRECISION=auto
    SHAPE="--updates 10 --warmup_updates 3"
    ENV_ARGS="--num_envs 16 --steps 2000 --policy 50m"
    LOOP_ARGS="--model_size 50m --num_envs 16 --learning_starts 2048 --block 16 --blocks 2"
    RUNS="50m:eager 50m:compiled 12m:eager 12m:compiled 50m:cudagraphs"
fi
START=$(date +%s)
status=0

# run LIMIT_S CMD...: CMD under `timeout`, at most LIMIT_S seconds and what is left of the budget;
# its stdout in $out. Fails (and says why on stderr) when it was skipped, timed out or failed.
run() {
    local limit=$1; shift
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        echo "skipped (budget of ${BUDGET_S} s spent): $*" >&2
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    out=$(timeout -k 5 "$limit" "$@")
    local code=$?
    if [ $code -ne 0 ]; then
        [ $code -eq 124 ] && echo "timed out after ${limit} s: $*" >&2 || echo "failed ($code): $*" >&2
        return 1
    fi
    echo "$out" >&2
}

row() {  # row MODE JSON: one JSON line of update_speed.py → a markdown row
    "$PY" - "$@" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
share = "-" if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.0f} % of {r['peak_dtype']}"
print(f"| {r['model_size']} | {r['precision']} | {sys.argv[1]} | {f(r['sec_per_update_median'], 3)} "
      f"(min {f(r['sec_per_update_min'], 3)}) | {f(r['gflop_per_update'], 0)} | {f(r['gflops_achieved'], 0)} "
      f"| {share} | {f(r['compile_sec'], 0)} | {r['peak_memory_bytes'] / 2**30:.1f} GiB | {r['device_name']} |")
PY
}

echo "| model | precision | mode | s / update (median) | GFLOP / update | GFLOP/s | share of matmul peak | compile s | peak memory | device |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for item in $RUNS; do
    size=${item%%:*}; mode=${item#*:}
    case $mode in
        eager) flags="--no-compile"; limit=90 ;;
        compiled) flags="--compile"; limit=180 ;;
        cudagraphs) flags="--compile --compile_mode reduce-overhead"; limit=180 ;;
    esac
    cmd="$PY bench/update_speed.py --model_size $size --device $DEVICE --precision $PRECISION $SHAPE $flags"
    if [ "$DRY" = 1 ] && [ "$mode" != eager ]; then
        echo "dry run, not run: $cmd" >&2
        continue
    fi
    if run "$limit" $cmd; then
        row "$mode" "$out" || status=1
    else
        status=1
    fi
done

if run 120 "$PY" bench/loop_speed.py --device "$DEVICE" --precision "$PRECISION" $LOOP_ARGS; then
    "$PY" - "$out" <<'PY' || status=1
import json, sys
r = json.loads(sys.argv[1])
print(f"training loop, {r['model_size']}, {r['num_envs']} envs, {r['device']}: {r['overlap']['agent_steps_per_sec']:.0f} "
      f"agent steps / s ({r['overlap']['updates']} updates), plain order {r['plain']['agent_steps_per_sec']:.0f}")
PY
else
    status=1
fi

if run 60 "$PY" bench/env_speed.py --device "$DEVICE" $ENV_ARGS; then
    "$PY" - "$out" <<'PY' || status=1
import json, sys
r = json.loads(sys.argv[1])
print(f"collection, {r['policy']} policy, {r['num_envs']} envs, {r['device']}: {r['env_steps_per_sec']:.0f} agent steps / s")
PY
else
    status=1
fi
echo "total: $(($(date +%s) - START)) s of a budget of ${BUDGET_S} s" >&2
exit $status
