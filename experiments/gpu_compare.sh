#!/usr/bin/env bash
# SimCLR against SPCL on one GPU: ResNet-18, CIFAR-10, AMP, the same epochs for both, then the
# kNN and linear-probe table. Needs no network: the data and faiss must be on the machine.
#
#   DATA=/path/to/cifar10 bash experiments/gpu_compare.sh
#   DATA=... FAISS_WHEEL=/path/to/faiss_cpu-*.whl EPOCHS=20 bash experiments/gpu_compare.sh
#
# DATA: torchvision's cifar-10-batches-py/ or an ImageFolder tree with train/ and test/.
# FAISS_WHEEL: installed offline when faiss is missing (the faiss-cpu wheel is enough; its k-means
# then runs on the CPU, a second or two per epoch at this size).
# Expected duration on one H100 with EPOCHS=20: about 10 minutes (an estimate, not yet measured).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA to a CIFAR-10 folder}
EPOCHS=${EPOCHS:-20}
OUT=${OUT:-results/gpu_cifar10_e${EPOCHS}}
if ! python -c "import faiss" 2>/dev/null; then
  [ -n "${FAISS_WHEEL:-}" ] || { echo "faiss is missing: pip install faiss-gpu, or set FAISS_WHEEL"; exit 2; }
  pip install --no-index --no-deps "$FAISS_WHEEL"
fi
COMMON=(--dataset cifar10 --data "$DATA" --arch resnet18 --epochs "$EPOCHS" --batch-size 512
        --warmup-epochs 2 --knn-every 5 --workers 8)
declare -A ROWS=([simclr_s0]="--w-metric 0 --w-proto 0" [spcl_s0]="--proto-start-epoch 2")
for row in simclr_s0 spcl_s0; do
  dir="$OUT/$row"
  start=$(date +%s)
  # shellcheck disable=SC2086
  python train.py "${COMMON[@]}" ${ROWS[$row]} --out "$dir"
  python linear_eval.py --checkpoint "$dir/checkpoint.pth" --data "$DATA" --cached --out "$dir/linear_eval.jsonl"
  echo "{\"row\": \"$row\", \"wall_seconds\": $(( $(date +%s) - start )), \"epochs\": $EPOCHS}" > "$dir/row.json"
done
python experiments/report.py "$OUT"
