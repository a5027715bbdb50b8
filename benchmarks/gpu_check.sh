#!/usr/bin/env bash
# GPU benchmark for a lent H100/H200, stages in priority order within BENCH_BUDGET_S (default 480 s).
#
#   bash benchmarks/gpu_check.sh            # from anywhere; results in $OUT/bench/ if OUT is set
#
# Needs torch, timm, transformers, peft; not nnunetv2. Without dynamic_network_architectures the
# primus*/unet rows are listed as skipped (installing it offline is not possible; nothing is fetched).
# Every stage writes its JSON row by row (<stage>.json), its table (<stage>.txt) and stderr
# (<stage>.err), so a stage cut short by its time limit keeps the rows it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -n "${OUT:-}" ]]; then DEST=$OUT/bench; else DEST=benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S); fi
BUDGET=${BENCH_BUDGET_S:-480}
STARTUP_S=20  # python imports + matmul peak before the first row
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

"$PY" -c "import torch, timm, transformers, peft
print('torch', torch.__version__, '| timm', timm.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)
assert torch.cuda.is_available(), 'no CUDA device'
print(torch.cuda.get_device_name(0))" || exit 1
"$PY" -c "import dynamic_network_architectures" 2>/dev/null \
  || echo "dynamic_network_architectures missing: primus/primus_ms/unet rows will be skipped"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null

FIRST=1
# stage NAME CAP_S ROW_S ARGS...: benchmark.py for at most CAP_S seconds (less if the budget is nearly
# spent); no new row starts in the last ROW_S seconds (about one row's time) of that limit.
stage() {
  local name=$1 cap=$2 row=$3; shift 3
  local left=$(( BUDGET - SECONDS ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < row + STARTUP_S )); then echo "== $name: skipped (${left}s of the budget left)"; return; fi
  echo "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$PY" benchmarks/benchmark.py "$@" --time-budget $(( limit - row - STARTUP_S )) \
    --out "$DEST/$name.json" >"$DEST/$name.txt" 2>"$DEST/$name.err"
  local rc=$?
  if (( FIRST )); then grep -v '^|' "$DEST/$name.txt" | grep -v '^JSON' | grep -v '^$'; FIRST=0; fi
  grep '^|' "$DEST/$name.txt"
  (( rc == 0 )) || { echo "   exit $rc (124: time limit; finished rows are in $name.json); stderr tail:"; tail -n 4 "$DEST/$name.err"; }
}

M=hf_dpt  # every stage that compares against HF DPT includes it, so the ratio column is filled
# (1) 512 batch 4 bf16: HF DPT-Large vs ours, fused and plain AdamW, then torch.compile (fused).
#     Its 'infer img/s' column is (3), inference at 512 with batch 16 (the default --infer-batch).
stage s1_512_bf16 120 15 --models $M dpt dpt_light --sizes 512:4 --precision bf16 --fused on off
stage s1_512_bf16_compile 330 110 --models dpt_light $M dpt --sizes 512:4 --precision bf16 --compile regional on --skip-infer
# (2) 1024 batch 3 bf16, dpt_light with and without gradient checkpointing.
stage s2_1024_ckpt 90 30 --models dpt_light --sizes 1024:3 --precision bf16 --grad-ckpt on off
# (2b) channels_last (model and input) against s1's fused bf16 rows: should the trainer use it?
stage s2b_512_channels_last 60 15 --models dpt_light $M --sizes 512:4 --precision bf16 --fused on --channels-last --skip-infer
# (4) the other decoders and nnU-Net's U-Net, bf16, no compile.
stage s4_512_decoders 110 15 --models $M upernet segformer primus primus_ms unet --sizes 512:4 --precision bf16
# (5) fp32 and fp16 (autocast + GradScaler).
stage s5_512_fp32_fp16 110 20 --models $M dpt dpt_light --sizes 512:4 --precision fp32 fp16
# (6) if time is left: LoRA rank 8 on the backbone.
stage s6_512_lora 60 15 --models dpt dpt_light --sizes 512:4 --precision bf16 --lora on

echo "== done in ${SECONDS}s; results in $DEST"
