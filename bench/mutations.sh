#!/usr/bin/env bash
# Break one algorithmic detail of model.py at a time in a throw-away git worktree of HEAD and
# run the learning tests on it: each mutation must make at least one of them fail.
#   bash bench/mutations.sh                 # all mutations, Catch and Rhythm (~16 min, 2 cores)
#   TESTS=rhythm bash bench/mutations.sh    # pytest -k expression for the tests to run
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=${TESTS:-"catch or rhythm"}
WORK=$(mktemp -d)
trap 'git worktree remove --force "$WORK/tree" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

MUTATIONS=(
  "advantage sign flipped|s#adv = (ret - value\[:, :-1\].detach()) / scale#adv = -(ret - value[:, :-1].detach()) / scale#"
  "reward loss dropped|s#loss_scales = dict(rec=1.0, rew=1.0,#loss_scales = dict(rec=1.0, rew=0.0,#"
  "is_first reset removed|s#keep = (1.0 - is_first.to(deter.dtype)).unsqueeze(-1)#keep = torch.ones_like(deter[..., :1])#"
)

for entry in "${MUTATIONS[@]}"; do
  name=${entry%%|*}
  edit=${entry#*|}
  git worktree add --detach --quiet "$WORK/tree" HEAD
  sed -i "$edit" "$WORK/tree/model.py"
  if git -C "$WORK/tree" diff --quiet; then
    echo "error: the mutation '$name' no longer matches model.py" >&2
    exit 1
  fi
  log="$WORK/log"
  (cd "$WORK/tree" && python -m pytest -q -s tests/test_learning.py -k "$TESTS" >"$log" 2>&1) || true
  returns=$(grep -oE "(catch|rhythm): trained [^,]+, random [-0-9.]+" "$log" | paste -sd " " || true)
  verdict=$(grep -E "[0-9]+ (passed|failed)" "$log" | tail -1)
  echo "$name: ${returns:-no returns printed} | ${verdict}"
  git worktree remove --force "$WORK/tree"
done
