#!/usr/bin/env bash
# The prepared GPU check (experiments/gpu_check.py), ready for a machine that has torch and
# torchvision but no faiss. Carry the faiss-cpu wheel (19 MB; its k-means runs on the CPU's
# threads there) in .whl/ (ignored by git), fetched here once with:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl faiss-cpu==1.15.1
#
# then, on the GPU machine, from the repository root (carry .whl):
#
#   bash experiments/gpu_check.sh | tee $OUT/gpu_check.jsonl
#
# One JSON line per section; about 5-8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import faiss" 2>/dev/null; then
  ls .whl/faiss_cpu-*.whl >/dev/null 2>&1 || { echo "faiss is missing and .whl/ holds no faiss_cpu wheel" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/faiss_cpu-*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 experiments/gpu_check.py "$@"
