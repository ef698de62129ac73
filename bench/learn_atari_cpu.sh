#!/usr/bin/env bash
# Atari learning on a CPU for a fixed wall-clock budget, against the random policy.
#
#   bash bench/learn_atari_cpu.sh Boxing                # 60 minutes (BUDGET_S=3600)
#   BUDGET_S=600 bash bench/learn_atari_cpu.sh Pong     # any ALE/<Game>-v5 game
#
# Trains `ALE/<GAME>-v5` with settings for many small updates per CPU-second: the tiny model,
# 4 envs, batch 8 × 16 steps (a short window is enough: with replay context it starts from the
# stored latent of the step before it), train ratio 64 and the learning rates of the CPU learning
# tests. Stops at the budget (train.py --max_time: the checkpoint is written), then plays the
# random policy for as many episodes as it compares (EPISODES, default 20) and prints one JSON
# line: the mean return of the last EPISODES training episodes next to the random level, and
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
python train.py --env "ALE/${GAME}-v5" --max_time "$BUDGET_S" --model_size tiny \
    --num_envs 4 --batch_size 8 --sequence_length 16 --train_ratio 64 --lr 1e-3 \
    --actor_lr 3e-4 --critic_lr 1e-3 --warmup 100 --learning_starts 1000 \
    --total_steps 100000000 --log_interval 2000 --video_interval 0 --image_interval 0 \
    --checkpoint_interval 20000 --wandb_mode disabled --run_dir "$RUN_DIR" "$@" || true
python bench/versus_random.py "$RUN_DIR" --episodes "$EPISODES" | tee "$RUN_DIR/versus_random.json"
RANDOM_MEAN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['random_mean'])" "$RUN_DIR/versus_random.json")
python bench/return_curve.py "$RUN_DIR" --csv "$RUN_DIR/return_curve.csv" --random "$RANDOM_MEAN" > /dev/null
