#!/usr/bin/env bash
# The GPU check, one script (under 10 minutes on one GPU): update speed of the 12m and 50m models
# with bf16, eager vs compiled vs compiled with CUDA graphs, then collection with the 50m policy.
# Prints a markdown row per run for bench/RESULTS.md (the JSON lines go to stderr).
#
#   bash bench/gpu.sh             # on a machine with a CUDA GPU
#   bash bench/gpu.sh --dry-run   # anywhere: tiny sizes on the CPU, eager only; the compiled
#                                 # runs are printed, not run
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1; DEVICE=cpu; SIZES="tiny"; PRECISION=fp32
    SHAPE="--batch_size 2 --sequence_length 4 --horizon 2 --updates 1 --warmup_updates 1 --peak_size 256 --threads 1"
    ENV_ARGS="--num_envs 2 --steps 16 --policy tiny --threads 1"
else
    DRY=0; DEVICE=cuda; SIZES="12m 50m"; PRECISION=bf16
    SHAPE="--updates 10 --warmup_updates 3"
    ENV_ARGS="--num_envs 16 --steps 2000 --policy 50m"
fi

row() {  # row MODE JSON: one JSON line of update_speed.py → a markdown row
    "$PY" - "$@" <<'PY'
import json, sys
r = json.loads(sys.argv[2])
f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
share = "-" if r["share_of_peak"] is None else f"{100 * r['share_of_peak']:.0f} %"
print(f"| {r['model_size']} | {r['precision']} | {sys.argv[1]} | {f(r['sec_per_update_median'], 3)} "
      f"(min {f(r['sec_per_update_min'], 3)}) | {f(r['gflop_per_update'], 0)} | {f(r['gflops_achieved'], 0)} "
      f"| {share} | {f(r['compile_sec'], 0)} | {r['peak_memory_bytes'] / 2**30:.1f} GiB | {r['device_name']} |")
PY
}

echo "| model | precision | mode | s / update (median) | GFLOP / update | GFLOP/s | share of matmul peak | compile s | peak memory | device |"
echo "|---|---|---|---|---|---|---|---|---|---|"
status=0
for size in $SIZES; do
    for mode in eager compiled cudagraphs; do
        case $mode in
            eager) flags="--no-compile" ;;
            compiled) flags="--compile" ;;
            cudagraphs) flags="--compile --compile_mode reduce-overhead" ;;
        esac
        cmd="$PY bench/update_speed.py --model_size $size --device $DEVICE --precision $PRECISION $SHAPE $flags"
        if [ "$DRY" = 1 ] && [ "$mode" != eager ]; then
            echo "dry run, not run: $cmd" >&2
            continue
        fi
        if out=$($cmd); then
            echo "$out" >&2
            row "$mode" "$out" || status=1
        else
            echo "failed: $cmd" >&2
            status=1
        fi
    done
done

cmd="$PY bench/env_speed.py --device $DEVICE $ENV_ARGS"
if out=$($cmd); then
    echo "$out" >&2
    "$PY" - "$out" <<'PY' || status=1
import json, sys
r = json.loads(sys.argv[1])
print(f"collection, {r['policy']} policy, {r['num_envs']} envs, {r['device']}: {r['env_steps_per_sec']:.0f} agent steps / s")
PY
else
    echo "failed: $cmd" >&2
    status=1
fi
exit $status
