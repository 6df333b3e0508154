#!/usr/bin/env bash
# A reward model on mined hotel pairs (the SFT model's own mistakes against the references),
# its held-out pairwise accuracy, and the raw log-prob baseline (does the SFT policy itself give
# the reference a higher log-probability than its mistake?) on the same held-out pairs.
#   bash examples/hotel_reward_model.sh     (SFT_DIR: an SFT adapter; default runs/hotel_lora)
set -euo pipefail
DATA=${HOTEL_DATA:-../shared/data/hotel}
SFT=${SFT_DIR:-runs/hotel_lora}
RUN=${RUN_DIR:-runs/hotel_rm}
MINED=${MINED:-runs/hotel_rm_pairs.jsonl}
MODEL=${MODEL:-smollm2-135m-instruct}
if command -v tunelab >/dev/null; then TL=(tunelab); PY=python3; else export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}; TL=(python3 -m tunelab.cli); PY=python3; fi
SECONDS=0
if [ ! -f "$SFT/adapter_config.json" ]; then
    "${TL[@]}" train examples/hotel_lora.yaml "output_dir=$SFT" overwrite_output_dir=true disable_tqdm=true
fi
"${TL[@]}" data mine-pairs "$DATA/train.jsonl" "$MINED" --model "$MODEL" --adapter "$SFT" --task hotel \
    ${EVAL_BATCH:+--batch-size "$EVAL_BATCH"} --no-progress
echo "mining: ${SECONDS}s"
"${TL[@]}" train stage=rm "model_name_or_path=$MODEL" "dataset=$MINED" val_size=0.2 val_split_by=record \
    template=hotel cutoff_len=2048 learning_rate=1e-4 num_train_epochs=2 per_device_train_batch_size=8 \
    eval_strategy=epoch logging_steps=5 save_strategy=no "output_dir=$RUN" overwrite_output_dir=true \
    bf16=true disable_tqdm=true "$@"
echo "rm: ${SECONDS}s"
# The same held-out pairs: the reward model's accuracy and the SFT policy's log-prob baseline.
"$PY" bench/rm_pairs.py --run "$RUN" --model "$MODEL" --adapter "$SFT"
echo "total: ${SECONDS}s"
