#!/usr/bin/env bash
# Break one algorithmic detail of model.py at a time in a throw-away git worktree of HEAD and
# run the learning tests on it: each mutation must make at least one of them fail. Exits 1 if
# the unmutated tree fails or a mutation survives.
#   bash bench/mutations.sh                 # all mutations, Catch and Rhythm (~27 min, 2 cores)
#   TESTS=rhythm bash bench/mutations.sh    # pytest -k expression for the tests to run
#   ONLY=is_first bash bench/mutations.sh   # only the mutations whose name contains this
# A mutation counts as caught only when every test ran to its measurement and one failed on it
# (a test that crashes on the edited code proves nothing about the learning).
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=${TESTS:-"catch or rhythm"}
ONLY=${ONLY:-}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python )}
WORK=$(mktemp -d)
cleanup() {
  git worktree remove --force "$WORK/tree" >/dev/null 2>&1 || true
  git worktree prune
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MUTATIONS=(
  "none|"
  "advantage sign flipped|s#adv = (ret - value\[:, :-1\].detach()) / scale#adv = -(ret - value[:, :-1].detach()) / scale#"
  "reward loss dropped|s#loss_scales = dict(rec=1.0, rew=1.0,#loss_scales = dict(rec=1.0, rew=0.0,#"
  "is_first reset removed|s#keep = (1.0 - is_first.to(deter.dtype)).unsqueeze(-1)#keep = torch.ones_like(is_first, dtype=deter.dtype).unsqueeze(-1)#"
)

wrong=()
for entry in "${MUTATIONS[@]}"; do
  name=${entry%%|*}
  edit=${entry#*|}
  if [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]]; then continue; fi
  git worktree add --detach --quiet "$WORK/tree" HEAD
  if [ -n "$edit" ]; then
    sed -i "$edit" "$WORK/tree/model.py"
    if git -C "$WORK/tree" diff --quiet; then
      echo "error: the mutation '$name' no longer matches model.py" >&2
      exit 1
    fi
  fi
  log="$WORK/log"
  rc=0
  (cd "$WORK/tree" && "$PYTHON" -m pytest -q -s tests/test_learning.py -k "$TESTS" >"$log" 2>&1) || rc=$?
  returns=$(grep -oE "(catch|rhythm): trained [^,]+, random [-0-9.]+" "$log" | paste -sd " " || true)
  verdict=$(grep -E "[0-9]+ (passed|failed|errors?)" "$log" | tail -1 || true)
  echo "$name: ${returns:-no returns printed} | ${verdict:-no pytest summary (see below)}"
  # Every test that ran must have printed its returns (it did not crash before measuring).
  ran=$(grep -oE "[0-9]+ (passed|failed)" <<<"$verdict" | awk '{n += $1} END {print n + 0}')
  measured=$(grep -cE "(catch|rhythm): trained [-0-9.]+, random [-0-9.]+" "$log" || true)
  if [ -z "$verdict" ] || [ "$measured" != "$ran" ]; then tail -20 "$log"; fi
  # The unmutated tree must pass (rc 0); a mutation must make a measuring test fail (rc 1).
  if [ "$measured" != "$ran" ] || [ "$ran" = 0 ] \
     || { [ -z "$edit" ] && [ "$rc" != 0 ]; } || { [ -n "$edit" ] && [ "$rc" != 1 ]; }; then
    wrong+=("$name")
  fi
  git worktree remove --force "$WORK/tree"
done
if [ ${#wrong[@]} -gt 0 ]; then
  echo "not as expected: ${wrong[*]}" >&2
  exit 1
fi
