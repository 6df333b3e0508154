#!/bin/bash
# 1 x H100, call C: the Qwen2.5-7B-shaped 2-epoch recipe under cProfile: where the checkpoints' time goes.
set -x
E=$OUT/final7b; mkdir -p $E
export PYTHONPATH=src
python bench/user_path.py run --model qwen2.5-7b --steps -1 --profile $E/p7b.prof --out $E/u7b.json > $E/u7b.log 2>&1
grep "^done\|speed:" $E/u7b.log | tail -3
python - > $E/p7b_top.txt 2>&1 <<PY
import pstats
s = pstats.Stats("$E/p7b.prof")
s.sort_stats("cumulative").print_stats("checkpoint|save|adapters|tokenization_utils|atomic|safetensors|serialization", 45)
PY
head -80 $E/p7b_top.txt
rm -f $E/p7b.prof
