#!/usr/bin/env bash
# The hotel reference task end to end: LoRA fine-tune of the embedded model on the hotel
# train set, then base vs tuned on the test set (slot P/R/F1 on search turns, char BLEU-4
# on assistant turns). Extra arguments go to `tunelab train` as key=value overrides.
#   bash examples/hotel_reference.sh                 # CPU: hours; a GPU: minutes
#   bash examples/hotel_reference.sh bf16=true       # on a GPU
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
RUN=${RUN_DIR:-runs/hotel_lora}
BATCH=${EVAL_BATCH:-32}
tunelab train examples/hotel_lora.yaml "dataset=$DATA/train.jsonl" "output_dir=$RUN" "$@"
tunelab report "$RUN"
tunelab eval --model smollm2-135m-instruct --adapter "$RUN" --data "$DATA/test.jsonl" --task hotel \
    --compare-base --batch-size "$BATCH" --no-progress
