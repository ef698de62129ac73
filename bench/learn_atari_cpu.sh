#!/usr/bin/env bash
# Atari learning on a CPU for a fixed wall-clock budget, against the random policy.
#
#   bash bench/learn_atari_cpu.sh Boxing                # 60 minutes (BUDGET_S=3600)
#   BUDGET_S=600 bash bench/learn_atari_cpu.sh Pong     # any ALE/<Game>-v5 game
#
# Trains `ALE/<GAME>-v5` with train.py's CPU preset (--preset cpu: the tiny model, 4 envs, batch
# 8 × 16 steps, train ratio 64, the learning rates of the CPU learning tests, a lost life terminal,
# the entropy scale 1e-3: many small updates per CPU-second). Stops at the budget (train.py --max_time: the checkpoint is written), then plays
# the random policy for as many episodes as it compares (EPISODES, default 20) and prints one
# JSON line: the mean return of the last EPISODES training episodes next to the random level, and
# whether it is above it by more than two standard errors. <run_dir>/return_curve.png draws the
# curve with the random level. Extra arguments go to train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
    echo "usage: bash bench/learn_atari_cpu.sh GAME [train.py flags...]" >&2
    exit 2
fi
GAME=$1
shift
BUDGET_S=${BUDGET_S:-3600}
EPISODES=${EPISODES:-20}
RUN_DIR=${RUN_DIR:-runs/cpu-${GAME}-$(date +%Y%m%d-%H%M%S)}
python train.py --env "ALE/${GAME}-v5" --preset cpu --max_time "$BUDGET_S" --total_steps 100000000 \
    --video_interval 0 --image_interval 0 --wandb_mode disabled --run_dir "$RUN_DIR" "$@" || true
python bench/versus_random.py "$RUN_DIR" --episodes "$EPISODES" | tee "$RUN_DIR/versus_random.json"
RANDOM_MEAN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['random_mean'])" "$RUN_DIR/versus_random.json")
python bench/return_curve.py "$RUN_DIR" --csv "$RUN_DIR/return_curve.csv" --random "$RANDOM_MEAN" > /dev/null
