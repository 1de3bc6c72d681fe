#!/usr/bin/env bash
# Forked rows on real CIFAR-10 in the small CPU configuration: per seed, a SimCLR trunk of $TRUNK
# epochs on an $EPOCHS-epoch schedule, then every branch trains the remaining epochs from the
# trunk's checkpoint (train.py --fork-from), so all branches share their first epochs. Each
# finished row leaves metrics.jsonl (the trunk's lines, then its own), linear_eval.jsonl and
# row.json in $OUT/<row>_s<seed>/; checkpoints stay there, out of git.
#
#   bash experiments/fork.sh trunk_s0 simclr_s0 spcl_wcon2_s0    # rows of experiments/fork_rows.txt
#
# A finished row is skipped; an interrupted one resumes. Then: python experiments/report.py $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
EPOCHS=${EPOCHS:-20}
TRUNK=${TRUNK:-10}
OUT=${OUT:-results/cifar10_fork}
COMMON=(--dataset cifar10 --data "$DATA" --arch resnet18_narrow --epochs "$EPOCHS" --batch-size 512
        --warmup-epochs 1 --knn-every 1 --workers 2)

for row in "$@"; do
  dir="$OUT/$row"
  if [ -f "$dir/linear_eval.jsonl" ]; then echo "== $row: done, skipped"; continue; fi
  name=${row%_s*} seed=${row##*_s}
  flags=$(awk -v name="$name" '$1 == name { $1 = ""; print }' experiments/fork_rows.txt)
  [[ "$row" =~ _s[0-9]+$ && -n "$flags" ]] || {
    echo "unknown row $row: give <name>_s<seed>, a name of experiments/fork_rows.txt"; exit 2; }
  flags=${flags//\$TRUNK/$TRUNK}
  mkdir -p "$dir"
  echo "== $row"
  start=$(date +%s)
  if [ "$name" = trunk ]; then
    # Stop after epoch $TRUNK, also when resumed: --stop-after counts this process's epochs.
    done_epochs=$(python -c "import os, torch; p = '$dir/checkpoint.pth'; \
print(torch.load(p, weights_only=True)['epoch'] if os.path.exists(p) else 0)")
    extra=(--stop-after $(( TRUNK - done_epochs )))
    [ "$done_epochs" -lt "$TRUNK" ] || extra=()
  else
    extra=(--fork-from "$OUT/trunk_s$seed/checkpoint.pth")
  fi
  if [ "$name" != trunk ] || [ ${#extra[@]} -gt 0 ]; then
    # shellcheck disable=SC2086
    python train.py "${COMMON[@]}" $flags --seed "$seed" "${extra[@]}" --out "$dir"
  fi
  python linear_eval.py --checkpoint "$dir/checkpoint.pth" --data "$DATA" --cached \
      --out "$dir/linear_eval.jsonl"
  echo "{\"row\": \"$row\", \"wall_seconds\": $(( $(date +%s) - start )), \"epochs\": $EPOCHS, \"trunk\": $TRUNK, \"commit\": \"$(git rev-parse --short HEAD)\"}" > "$dir/row.json"
done
