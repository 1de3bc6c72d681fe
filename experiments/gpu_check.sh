#!/usr/bin/env bash
# The prepared GPU check (experiments/gpu_check.py), ready for a machine that has torch and
# torchvision but maybe no faiss: its torch k-means needs none. To compare faiss on the CPU's cores
# as well, carry the faiss-cpu wheel (19 MB) in .whl/ (ignored by git), fetched here once with:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl faiss-cpu==1.15.1
#
# then, on the GPU machine, from the repository root (carry .whl):
#
#   bash experiments/gpu_check.sh | tee $OUT/gpu_check.jsonl
#
# One JSON line per section; under 6 minutes on one H200. --smoke runs the sections at toy sizes,
# on the CPU too.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --smoke "* ]] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: error: no CUDA device here: it measures a GPU (the CPU test is: python3 experiments/gpu_check.py --smoke)" >&2
  exit 2
fi
if ! python3 -c "import faiss" 2>/dev/null && ls .whl/faiss_cpu-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/faiss_cpu-*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 experiments/gpu_check.py "$@"
