"""`data dedup` keeps its memory per record small: signatures go to a temporary file on disk
and the LSH buckets live in flat arrays, so files far larger than memory can be deduplicated."""

import random
import tracemalloc

from tunelab.data.tools.dedup import NearDuplicateIndex, normalise


def test_near_duplicate_index_holds_well_under_a_kilobyte_per_kept_record():
    rng = random.Random(0)
    texts = [normalise("".join(rng.choice("abcdefghij klmnop") for _ in range(120))) for _ in range(3000)]
    index = NearDuplicateIndex(0.9, num_perm=128)
    for number, text in enumerate(texts[:200], 1):  # warm up: first allocations of every structure
        index.match_or_add(number, text)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for number, text in enumerate(texts[200:], 201):
        assert index.match_or_add(number, text) is None  # random texts: all distinct
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert grown / 2800 < 600, f"{grown / 2800:.0f} bytes per kept record"  # datasketch's index: ~3 KB
    # A near copy of an early record is still found through the compact index.
    copy = texts[5][:60] + "z" + texts[5][61:]
    match = index.match_or_add(9999, copy)
    assert match is not None and match[0] == 6
