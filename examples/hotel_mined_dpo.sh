#!/usr/bin/env bash
# After examples/hotel_quality.sh (same machine: it reuses runs/hotel_split and the SFT run):
# decode the training split with the tuned model, keep its mistakes (wrong slots, wrong role,
# malformed JSON) as DPO pairs against the references, DPO from the SFT adapter (which is also
# the reference model) with slot F1 on the validation dialogues picking the checkpoint, and
# score the test set again. Extra arguments go to `tunelab train`.
#   bash examples/hotel_mined_dpo.sh
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
[ -f "$DATA/train.jsonl" ] || DATA=runs/hotel_data
SPLIT=${SPLIT_DIR:-runs/hotel_split}
SFT=${SFT_DIR:-runs/hotel_quality}
RUN=${RUN_DIR:-runs/hotel_dpo}
MINED=${MINED:-runs/hotel_mined.jsonl}  # not inside the split folder: `data split` refuses foreign files there
MODEL=${MODEL:-smollm2-135m-instruct}
if command -v tunelab >/dev/null; then TL=(tunelab); else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); fi
SECONDS=0
# The SFT run is an adapter on MODEL (LoRA) or a whole model (full fine-tuning): DPO trains a LoRA on
# top of it either way, and the SFT model itself (the adapter switched off) is the DPO reference.
if [ -f "$SFT/adapter_config.json" ]; then sft=(--model "$MODEL" --adapter "$SFT"); base=("model_name_or_path=$MODEL" "adapter_name_or_path=$SFT"); evalbase=$MODEL
else sft=(--model "$SFT"); base=("model_name_or_path=$SFT"); evalbase=$SFT; fi
"${TL[@]}" data mine-pairs "$SPLIT/train.jsonl" "$MINED" "${sft[@]}" \
    --task hotel ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress
echo "mining: ${SECONDS}s"
"${TL[@]}" train stage=dpo "${base[@]}" "dataset=$MINED" \
    val_size=0.1 template=hotel cutoff_len=4096 pref_beta=0.1 learning_rate=5e-5 num_train_epochs=2 \
    per_device_train_batch_size=4 gradient_accumulation_steps=2 per_device_eval_batch_size=16 \
    eval_strategy=steps eval_steps=10 eval_task=hotel "eval_task_dataset=$SPLIT/validation.jsonl" \
    metric_for_best_model=slot_f1 load_best_model_at_end=true save_steps=1000 save_total_limit=1 \
    logging_steps=5 "output_dir=$RUN" overwrite_output_dir=true bf16=true disable_tqdm=true "$@"
echo "dpo: ${SECONDS}s"
"${TL[@]}" report "$RUN"
"${TL[@]}" eval --model "$evalbase" --adapter "$RUN" --data "$DATA/test.jsonl" --task hotel \
    ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress
echo "total: ${SECONDS}s"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/hotel_dpo"
    cp -r "$RUN/trainer_log.jsonl" "$RUN/config.yaml" "$RUN/report" "$RUN/eval" "$RUN/task_eval" \
        "$MINED" "$OUT/hotel_dpo/" 2>/dev/null || true
fi
