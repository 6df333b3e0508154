#!/usr/bin/env bash
# GRPO on the hotel task, from an SFT adapter, with the task's own score as the reward
# (slot F1 + JSON validity + role correctness for search turns, char BLEU-4 for replies:
# HotelTask.reward), then the test set scored before and after. One GPU, the embedded 135M model.
#   bash examples/hotel_grpo.sh            (SFT_DIR=runs/hotel_quality reuses hotel_quality.sh's run)
# Extra arguments go to the GRPO `tunelab train`.
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
SFT=${SFT_DIR:-runs/hotel_lora}
RUN=${RUN_DIR:-runs/hotel_grpo}
MODEL=${MODEL:-smollm2-135m-instruct}
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); fi
SECONDS=0
if [ ! -f "$SFT/adapter_config.json" ]; then  # the SFT starting point (examples/hotel_lora.yaml)
    "${TL[@]}" train examples/hotel_lora.yaml "output_dir=$SFT" overwrite_output_dir=true disable_tqdm=true
    echo "sft: ${SECONDS}s"
fi
"${TL[@]}" eval --model "$MODEL" --adapter "$SFT" --data "$DATA/test.jsonl" --task hotel \
    ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress --output-dir "$RUN-sft-eval"
"${TL[@]}" train stage=grpo reward=hotel "model_name_or_path=$MODEL" "adapter_name_or_path=$SFT" \
    "dataset=$DATA/train.jsonl" template=hotel cutoff_len=2048 max_completion_length=256 num_generations=4 \
    temperature=1.0 kl_coef=0.04 learning_rate=2e-5 "max_steps=${STEPS:-40}" per_device_train_batch_size=8 \
    val_size=64 eval_strategy=steps eval_steps=20 eval_generate_samples=64 per_device_eval_batch_size=64 \
    logging_steps=5 save_strategy=no "output_dir=$RUN" overwrite_output_dir=true bf16=true disable_tqdm=true "$@"
echo "grpo: ${SECONDS}s"
"${TL[@]}" report "$RUN"
"${TL[@]}" eval --model "$MODEL" --adapter "$RUN" --data "$DATA/test.jsonl" --task hotel \
    ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress
echo "before (SFT):"; cat "$RUN-sft-eval/scores.md" 2>/dev/null || true
echo "after (GRPO):"; cat "$RUN/eval/scores.md" 2>/dev/null || true
echo "total: ${SECONDS}s"
