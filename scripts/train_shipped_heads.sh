#!/usr/bin/env bash
# Train the heads shipped in hf_decoding_ext/data/heads on the embedded SmolLM2-135M-Instruct (CPU, background):
#   nohup bash scripts/train_shipped_heads.sh /tmp/distill > /tmp/distill/train.out 2>&1 &
# Progress: <work>/train_<kind>.log and each head's train_log.jsonl. Responses/features are cached in <work>/work.
# Each kind trains with the options its shipped checkpoint was trained with (`train <kind> --recipe shipped`, the
# head class's `shipped_recipe`) into its declared folder (`shipped_name`); `hf-decoding-ext train --help` lists them.
# Overrides for every kind: KINDS (default: all shipped kinds), STEPS, WD (weight decay), PROMPTS.
set -euo pipefail
WORK=${1:-/tmp/distill}
HEADS=hf_decoding_ext/data/heads
PROMPTS=${PROMPTS:-200}   # distillation prompts per category (6 categories; 200 = all 1200)
common=(--base smollm2-135m-instruct --prompts "$PROMPTS" --max-new-tokens 256 --work-dir "$WORK/work" --recipe shipped)
overrides=(${STEPS:+--steps "$STEPS"} ${WD:+--weight-decay "$WD"})
shipped() { python -c "from hf_decoding_ext.speculative.drafters.feature_head import SHIPPED; print($1)"; }
for kind in ${KINDS:-$(shipped '" ".join(SHIPPED)')}; do
  out=$(shipped "SHIPPED['$kind']")
  python -m hf_decoding_ext train "$kind" "${common[@]}" "${overrides[@]}" --out "$WORK/out/$out" \
    --log "$WORK/train_$kind.log"
  mkdir -p "$HEADS/$out"
  cp "$WORK/out/$out/config.json" "$WORK/out/$out/model.safetensors" "$HEADS/$out/"
done
