#!/usr/bin/env bash
# The whole pipeline on a CUDA machine in under 8 minutes: the demo, and the seed DPT (ViT-L/16) trained
# compiled and eager at 512x512 (benchmarks/gpu_trainer_check.py says what each stage measures).
#
#   bash benchmarks/gpu_trainer_check.sh              # results in $OUT/trainer_check if OUT is set
#   bash benchmarks/gpu_trainer_check.sh --dry-run    # CPU, tiny sizes
#
# On a machine without nnU-Net, wheels fetched beforehand with ../shared/gpu/wheelhouse.sh into .whl/
# are installed first (nothing is downloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import nnunetv2.paths" 2>/dev/null && [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/.whl/stub${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -n "${OUT:-}" ]]; then DEST=$OUT/trainer_check; else DEST=benchmarks/results/trainer_check-$(date +%Y%m%d-%H%M%S); fi
"$PY" -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
exec "$PY" benchmarks/gpu_trainer_check.py --out "$DEST" "$@"
