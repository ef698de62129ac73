#!/usr/bin/env bash
# Pong from scratch on one GPU for a fixed wall-clock budget, then the return curve.
#
#   bash bench/learn_pong.sh                 # 25 minutes
#   BUDGET_S=600 bash bench/learn_pong.sh    # shorter
#
# The run stops at the budget (train.py --max_time writes its checkpoint and exits), then
# <run_dir>/return_curve.csv holds agent steps, wall seconds and the mean return of the last
# 10 episodes (return_curve.png draws it), and the final row is printed as JSON. Extra
# arguments go to train.py.
# Model size and train ratio: the choice (12m, train ratio 256, 8 envs, bf16) is a first guess,
# not yet measured on a GPU: an update of a small model is bound by the 64 + 15 sequential RSSM
# steps rather than by FLOPs, so a small model affords the high train ratio that made the 2023
# runs cross 0 on Pong at about 40k agent steps. bench/RESULTS.md records what it reached.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${BUDGET_S:-1500}
RUN_DIR=${RUN_DIR:-runs/learn_pong-$(date +%Y%m%d-%H%M%S)}
python train.py --env ALE/Pong-v5 --model_size 12m --max_time "$BUDGET_S" \
    --train_ratio 256 --num_envs 8 --total_steps 10000000 --learning_starts 2048 \
    --precision bf16 --log_interval 2000 --run_dir "$RUN_DIR" "$@" || true
python bench/return_curve.py "$RUN_DIR" --csv "$RUN_DIR/return_curve.csv"
