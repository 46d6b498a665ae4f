#!/usr/bin/env bash
# Train the four heads shipped in hf_decoding_ext/data/heads on the embedded SmolLM2-135M-Instruct (CPU, background):
#   nohup bash scripts/train_shipped_heads.sh /tmp/distill > /tmp/distill/train.out 2>&1 &
# Progress: <work>/train_<kind>.log and each head's train_log.jsonl. Responses/features are cached in <work>/work.
set -euo pipefail
WORK=${1:-/tmp/distill}
HEADS=hf_decoding_ext/data/heads
PROMPTS=${PROMPTS:-200}   # distillation prompts per category (6 categories; 200 = all 1200)
common=(--base smollm2-135m-instruct --prompts "$PROMPTS" --max-new-tokens 256 --work-dir "$WORK/work")
for kind in ${KINDS:-eagle medusa mlp-speculator hydra}; do
  case $kind in
    eagle) out=smollm2-135m-instruct-eagle-fspad; args=(--steps ${EAGLE_STEPS:-900} --batch-size 8 --lr 1e-3 --weight-decay ${WD:-0.01} --head-param cls_weight=0.25 --save-dtype float16) ;;
    medusa) out=smollm2-135m-instruct-medusa; args=(--steps ${HEAD_STEPS:-1200} --batch-size 256 --lr 2e-3 --weight-decay ${WD:-0.01}) ;;
    mlp-speculator) out=smollm2-135m-instruct-mlp-speculator; args=(--steps ${HEAD_STEPS:-1200} --batch-size 256 --lr 2e-3 --weight-decay ${WD:-0.01}) ;;
    hydra) out=smollm2-135m-instruct-hydra; args=(--steps ${HEAD_STEPS:-1200} --batch-size 256 --lr 2e-3 --weight-decay ${WD:-0.01}) ;;
  esac
  python -m hf_decoding_ext train "$kind" "${common[@]}" "${args[@]}" --out "$WORK/out/$out" --log "$WORK/train_$kind.log"
  mkdir -p "$HEADS/$out"
  cp "$WORK/out/$out/config.json" "$WORK/out/$out/model.safetensors" "$HEADS/$out/"
done
