#!/usr/bin/env bash
# The paper's Table 2 ablation on real CIFAR-10 in the small CPU configuration, with equal compute
# for every row (same epochs, same images seen). Each finished row leaves its metrics.jsonl and
# linear_eval.jsonl in results/cifar10_e$EPOCHS/<row>/ (checkpoints stay out of git), so rows can
# accumulate over several sittings:
#
#   bash experiments/table2.sh                      # every row
#   bash experiments/table2.sh simclr_s0 spcl_s0    # some rows; a finished row is skipped
#   EPOCHS=20 PROTO_START=4 bash experiments/table2.sh simclr_s0 spcl_s0   # results/cifar10_e20
#
# PROTO_START (default 1) is --proto-start-epoch for the k-means rows: the epochs before it are
# plain SimCLR, so the first clustering sees an encoder that has learnt something.
#
# Then: python experiments/report.py results/cifar10_e$EPOCHS   (the table)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10}
EPOCHS=${EPOCHS:-3}
PS=${PROTO_START:-1}
OUT=${OUT:-results/cifar10_e${EPOCHS}}
COMMON=(--dataset cifar10 --data "$DATA" --arch resnet18_narrow --epochs "$EPOCHS" --batch-size 512
        --warmup-epochs 1 --knn-every 1 --workers 2)

declare -A ROWS
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  ROWS[$name]=${flags//\$PS/$PS}
done < experiments/table2_rows.txt
ORDER=(random simclr_s0 spcl_s0 simclr_s1 spcl_s1 spcl_sce_s0 spcl_gt_s0 supervised_s0
       spcl_metric0.1_s0 spcl_proto0.1_s0 spcl_no_metric_s0 spcl_no_proto_s0 spcl_k10_s0 spcl_k50_s0)
[ $# -gt 0 ] && ORDER=("$@")

for row in "${ORDER[@]}"; do
  dir="$OUT/$row"
  if [ -f "$dir/linear_eval.jsonl" ]; then echo "== $row: done, skipped"; continue; fi
  mkdir -p "$dir"
  echo "== $row"
  start=$(date +%s)
  commit=$(git rev-parse --short HEAD)
  if [ "$row" = random ]; then
    # The floor: an untrained encoder, evaluated the same way.
    python -c "import torch; from models import build_encoder, export_encoder; \
torch.manual_seed(0); export_encoder(build_encoder('resnet18_narrow', True)[0], '$dir/encoder.pth')"
    ckpt=("$dir/encoder.pth" --arch resnet18_narrow --dataset cifar10)
    python linear_eval.py --checkpoint "${ckpt[@]}" --data "$DATA" --knn --out "$dir/knn.jsonl"
  else
    [ -n "${ROWS[$row]+x}" ] || { echo "unknown row $row; rows: random ${!ROWS[*]}"; exit 2; }
    # shellcheck disable=SC2086
    python train.py "${COMMON[@]}" ${ROWS[$row]} --out "$dir"
    ckpt=("$dir/checkpoint.pth")
  fi
  python linear_eval.py --checkpoint "${ckpt[@]}" --data "$DATA" --cached --out "$dir/linear_eval.jsonl"
  echo "{\"row\": \"$row\", \"wall_seconds\": $(( $(date +%s) - start )), \"epochs\": $EPOCHS, \"proto_start\": $PS, \"commit\": \"$commit\"}" > "$dir/row.json"
done
