#!/usr/bin/env bash
# One game of the Atari100k benchmark (normally on one GPU): train with --atari100k, then
# evaluate the final checkpoint.
#
#   bash bench/atari100k.sh Pong 0                      # game name as in scores/, seed
#   MODEL_SIZE=50m EVAL_EPISODES=20 bash bench/atari100k.sh Breakout 1 --precision bf16
#
# The run goes to runs/atari100k/<Game>-s<seed> (RUN_ROOT to change the folder); a run that was
# stopped resumes where its checkpoint left off. The final evaluation writes
# eval_100000.json (EVAL_EPISODES episodes, the policy sampled as in training) and its best
# episode's mp4; `python bench/hns.py runs/atari100k` then builds the table over games and seeds.
# MODEL_SIZE defaults to 200m, the sizes of the official config's defaults. Extra arguments go
# to the training run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
    echo "usage: bash bench/atari100k.sh GAME SEED [train.py flags...]" >&2
    exit 2
fi
GAME=$1 SEED=$2
shift 2
RUN_DIR=${RUN_ROOT:-runs/atari100k}/${GAME}-s${SEED}
if [ -f "$RUN_DIR/checkpoint.pt" ]; then
    python train.py --resume "$RUN_DIR/checkpoint.pt" "$@"
else
    python train.py --env "ALE/${GAME}-v5" --atari100k --seed "$SEED" \
        --model_size "${MODEL_SIZE:-200m}" --run_dir "$RUN_DIR" "$@"
fi
python train.py --resume "$RUN_DIR/checkpoint.pt" --eval_episodes "${EVAL_EPISODES:-100}"
python bench/return_curve.py "$RUN_DIR" --csv "$RUN_DIR/return_curve.csv"
