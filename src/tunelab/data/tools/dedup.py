"""`tunelab data dedup`: drop exact and near-duplicate records, keeping the first of each group.

Exact duplicates share the hash of their normalised text (Unicode NFKC, case-folded,
whitespace collapsed). Near duplicates are found with MinHash LSH (datasketch) over
character n-grams, so Chinese and other unsegmented scripts work, and each LSH candidate
is confirmed against its stored signature before a record is dropped. Memory per kept
record: one 16-byte hash and about 30 bytes per LSH band; the `num_perm` x 4-byte
signatures go to a temporary file, so the file to deduplicate may be larger than memory.

Rows that are earlier turns of a longer row (one dialogue stored as its growing prefixes, as
the hotel set is) look alike as whole records although each teaches a different turn:
`compare="auto"` (the default) detects them, with the prefix keys dialogue folding uses, and
then compares the last exchange of each row instead, and says so.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from array import array
from dataclasses import dataclass, field

import numpy as np
from datasketch.lsh import _optimal_param

from tunelab.data.fold import prefix_keys
from tunelab.data.readers import location, parse_record
from tunelab.data.tools.common import (
    check_output_path,
    exchange_text,
    item_text,
    raw_records,
    snippet,
    table,
    valid_items,
    write_records,
)
from tunelab.data.types import Conversation
from tunelab.errors import TunelabError


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_key(normalised: str) -> bytes:
    return hashlib.blake2b(normalised.encode("utf-8"), digest_size=16).digest()


def shingle_hashes(normalised: str, n: int) -> np.ndarray:
    """32-bit hashes (as uint64) of the character n-grams of a normalised text; the whole
    text is one n-gram when shorter than n. Vectorised: per-n-gram Python calls were 3/4
    of dedup's time. Repeats are left in: they cannot change a minimum."""
    codes = np.frombuffer(normalised.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    width = max(1, min(n, len(codes)))
    hashes = np.zeros(max(1, len(codes) - width + 1), dtype=np.uint64)
    for k in range(min(width, len(codes))):  # polynomial hash of each window; uint64 wraps on purpose
        hashes = hashes * np.uint64(1_000_003) + codes[k: k + len(hashes)]
    return (hashes * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)  # Fibonacci hashing: well-mixed high bits


class MinHasher:
    """MinHash signatures with multiply-shift hash functions h(x) = ((a*x + b) mod 2^64) >> 32,
    computed for all n-grams and permutations at once in numpy."""

    CHUNK = 4096  # n-grams per step, so a 10 MB record needs no 10 GB matrix

    def __init__(self, num_perm: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        out = np.full(len(self.a), np.iinfo(np.uint32).max, dtype=np.uint64)
        for start in range(0, len(hashes), self.CHUNK):
            block = hashes[start:start + self.CHUNK, None] * self.a + self.b
            np.minimum(out, (block >> np.uint64(32)).min(axis=0), out=out)
        return out.astype(np.uint32)


@dataclass
class Duplicate:
    number: int  # the removed record
    where: str
    kind: str  # "exact" | "near"
    similarity: float  # estimated Jaccard similarity to the kept record (1.0 for exact)
    example: str


@dataclass
class DedupResult:
    records: int = 0  # valid records read
    format: str | None = None
    invalid: set[int] = field(default_factory=set)  # record numbers --skip-invalid dropped
    groups: dict[int, list[Duplicate]] = field(default_factory=dict)  # kept record number -> removed
    removed_numbers: set[int] = field(default_factory=set)
    heads: dict[int, tuple[str, str]] = field(default_factory=dict)  # kept number -> (where, example)
    written: int = 0
    compare: str = "record"  # what was compared: whole records or the last exchange
    compare_note: str = ""  # why, when compare="auto" chose

    def add(self, head: int, duplicate: Duplicate) -> None:
        self.groups.setdefault(head, []).append(duplicate)
        self.removed_numbers.add(duplicate.number)

    def count(self, kind: str) -> int:
        return sum(d.kind == kind for dups in self.groups.values() for d in dups)

    def largest_groups(self, limit: int) -> list[tuple[int, list[Duplicate]]]:
        return sorted(self.groups.items(), key=lambda g: (-len(g[1]), g[0]))[:limit]

    def summary(self, examples: int = 5) -> str:
        rows = [["valid records read", self.records], ["exact duplicates removed", self.count("exact")],
                ["near duplicates removed", self.count("near")], ["records written", self.written]]
        if self.invalid:
            rows.insert(1, ["invalid records skipped", len(self.invalid)])
        lines = [table(["dedup", "count"], rows)]
        if self.compare_note:
            lines.append(self.compare_note)
        for head, dups in self.largest_groups(examples):
            where, example = self.heads.get(head, (f"record {head}", ""))
            lines.append(f"\nkept    {where}: {example}")
            for d in dups[:3]:
                lines.append(f"removed {d.where} ({d.kind}, similarity {d.similarity:.2f}): {d.example}")
            if len(dups) > 3:
                lines.append(f"... and {len(dups) - 3} more in this group")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "records": self.records, "written": self.written, "skipped_invalid": len(self.invalid),
            "compare": self.compare,
            "exact_removed": self.count("exact"), "near_removed": self.count("near"),
            "groups": [{"kept": self.heads.get(h, ("", ""))[0], "kept_example": self.heads.get(h, ("", ""))[1],
                        "removed": [{"where": d.where, "kind": d.kind, "similarity": round(d.similarity, 3),
                                     "example": d.example} for d in dups]}
                       for h, dups in self.largest_groups(len(self.groups))],
        }


class NearDuplicateIndex:
    """MinHash LSH over the kept records: `match_or_add` names the kept record a text
    nearly repeats, or keeps the text as a new one.

    Compact, so memory does not bound the file size: signatures go to an unnamed temporary
    file (read back only to confirm candidates), and each of the bands' buckets is one slot
    of a flat hash table plus a chain link per record: about 30 bytes per band and kept
    record, against ~3 KB per record for datasketch's own index.
    """

    def __init__(self, threshold: float, num_perm: int = 128, ngram: int = 5):
        if not 0 < threshold <= 1:
            raise TunelabError(f"--near {threshold} is not in (0, 1]", where="dedup",
                               fix="use e.g. --near 0.9 (Jaccard similarity of character n-grams), or 0 for exact only")
        if num_perm < 2:  # the LSH needs at least two permutations to form bands
            raise TunelabError(f"--num-perm {num_perm} is too small", where="dedup", fix="use --num-perm 128 (the default)")
        if ngram < 1:
            raise TunelabError(f"--ngram {ngram} must be at least 1", where="dedup", fix="use --ngram 5 (the default)")
        self.threshold, self.ngram = threshold, ngram
        # Banding tuned for recall (false negatives weigh 0.9): every candidate is confirmed
        # on its stored signature below, so a false positive costs one comparison, while a
        # missed pair stays in the data. At threshold 0.9 this finds 95% of pairs at J=0.93.
        self.bands, self.rows = _optimal_param(threshold, num_perm, 0.1, 0.9)
        self.hasher = MinHasher(num_perm)
        self.signatures = SignatureFile(num_perm)
        self.buckets = FlatTable()  # band key -> newest kept slot in that bucket
        self.chain = array("i")  # slot * bands + band -> previous kept slot in the same bucket (-1: none)
        self.numbers = array("q")  # slot -> record number
        rng = np.random.default_rng(7)
        self.mix = rng.integers(1, 2**63, size=(self.bands, self.rows), dtype=np.uint64) | np.uint64(1)

    def match_or_add(self, number: int, normalised: str) -> tuple[int, float] | None:
        """(kept record number, estimated Jaccard similarity) of the best match >= threshold;
        None after adding the text to the index as record `number`."""
        signature = self.hasher.signature(shingle_hashes(normalised, self.ngram))
        keys = self._band_keys(signature)
        best, seen = None, set()
        for band, key in enumerate(keys):  # LSH candidates, confirmed on the stored signatures
            slot = self.buckets.get(key)
            while slot >= 0:
                if slot not in seen:
                    seen.add(slot)
                    similarity = float(np.mean(self.signatures.read(slot) == signature))
                    if similarity >= self.threshold and (best is None or similarity > best[1]):
                        best = (self.numbers[slot], similarity)
                slot = self.chain[slot * self.bands + band]
        if best is None:
            slot = self.signatures.append(signature)
            self.numbers.append(number)
            for key in keys:
                self.chain.append(self.buckets.get(key))
                self.buckets.put(key, slot)
        return best

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        """One 64-bit key per band (multilinear hash of its rows, band number mixed in; never 0)."""
        rows = signature[: self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows)
        keys = (rows * self.mix).sum(axis=1) + np.arange(self.bands, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        return [int(k) | 1 for k in keys]


class SignatureFile:
    """Fixed-size uint32 signatures in an unnamed temporary file (gone when closed or killed)."""

    def __init__(self, num_perm: int):
        self.size = num_perm * 4
        self.file = tempfile.TemporaryFile()
        self.count = 0

    def append(self, signature: np.ndarray) -> int:
        os.pwrite(self.file.fileno(), signature.astype(np.uint32).tobytes(), self.count * self.size)
        self.count += 1
        return self.count - 1

    def read(self, slot: int) -> np.ndarray:
        return np.frombuffer(os.pread(self.file.fileno(), self.size, slot * self.size), dtype=np.uint32)


class FlatTable:
    """uint64 key (never 0) -> int slot, open addressing in two numpy arrays: 12 bytes a slot
    instead of a dict's ~100 bytes an entry (key object, value object, table entry)."""

    def __init__(self, capacity: int = 1024):
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.values = np.full(capacity, -1, dtype=np.int32)
        self.used = 0

    def _find(self, key: int) -> int:
        mask = len(self.keys) - 1
        i = (key >> 7) & mask
        while self.keys[i] and self.keys[i] != key:
            i = (i + 1) & mask
        return i

    def get(self, key: int) -> int:
        i = self._find(key)
        return int(self.values[i]) if self.keys[i] else -1

    def put(self, key: int, value: int) -> None:
        if 2 * (self.used + 1) > len(self.keys):
            self._grow()
        i = self._find(key)
        if not self.keys[i]:
            self.used += 1
            self.keys[i] = key
        self.values[i] = value

    def _grow(self) -> None:
        keys, values = self.keys, self.values
        self.keys = np.zeros(2 * len(keys), dtype=np.uint64)
        self.values = np.full(2 * len(keys), -1, dtype=np.int32)
        self.used = 0
        for key, value in zip(keys[keys != 0].tolist(), values[keys != 0].tolist()):
            self.put(key, value)


# What near/exact duplicates are judged on (see find_duplicates).
TEXT_OF = {"record": item_text, "exchange": exchange_text}


AUTO_SAMPLE = 5000  # records `compare="auto"` looks at
PREFIX_SHARE = 0.1  # ... and the share of them that must be earlier turns of another row


def prefix_rows(path, fmt: str = "auto", limit: int = AUTO_SAMPLE) -> tuple[int, int]:
    """(rows looked at, rows whose turns are the first turns of a longer row) in the first
    `limit` valid chat records."""
    full, strict, seen = [], set(), 0
    for _, _, item in valid_items(path, fmt, skip_invalid=True, skipped=set()):
        if seen == limit:
            break
        seen += 1
        if isinstance(item, Conversation) and item.messages and not item.is_plain_text:
            keys = prefix_keys(item)
            full.append(keys[-1])
            strict.update(keys[:-1])
    return seen, sum(key in strict for key in full)


def choose_compare(path, fmt: str = "auto") -> tuple[str, str]:
    """("exchange", why) for data whose rows share dialogue prefixes, else ("record", "")."""
    seen, prefixes = prefix_rows(path, fmt)
    if not seen or prefixes < PREFIX_SHARE * seen:
        return "record", ""
    return "exchange", (f"\ncompared by the last exchange (the turn before the answer + the answer): {prefixes} of "
                        f"{seen} rows are earlier turns of a longer row of their dialogue, so whole rows look alike "
                        "although each teaches a different turn (--compare record compares whole rows)")


def find_duplicates(path, fmt: str = "auto", *, near: float | None = 0.9, ngram: int = 5, num_perm: int = 128,
                    skip_invalid: bool = False, compare: str = "auto") -> DedupResult:
    """First pass: which records repeat an earlier one (hashes and signatures only in memory).

    `compare="record"` looks at whole records; `"exchange"` at the last exchange only
    (the turn before the answer, and the answer), for data whose rows share prefixes;
    `"auto"` picks exchange when they do (`choose_compare`).
    """
    result = DedupResult()
    result.compare, result.compare_note = choose_compare(path, fmt) if compare == "auto" else (compare, "")
    text_of = TEXT_OF[result.compare]
    index = NearDuplicateIndex(near, num_perm, ngram) if near else None
    exact: dict[bytes, int] = {}
    for number, file_format, item in valid_items(path, fmt, skip_invalid=skip_invalid, skipped=result.invalid):
        result.records += 1
        result.format = file_format
        text = text_of(item)
        normalised = normalise(text)
        key = exact_key(normalised)
        if key in exact:
            result.add(exact[key], Duplicate(number, location(item.source, number), "exact", 1.0, snippet(text)))
            continue
        match = index.match_or_add(number, normalised) if index else None
        if match:
            head, similarity = match
            result.add(head, Duplicate(number, location(item.source, number), "near", similarity, snippet(text)))
        else:
            exact[key] = number
    return result


def dedup_file(src: str | os.PathLike, dst: str | os.PathLike, fmt: str = "auto", *, near: float | None = 0.9,
               ngram: int = 5, num_perm: int = 128, skip_invalid: bool = False,
               compare: str = "auto") -> DedupResult:
    """Write `src` without its duplicates to `dst` (.jsonl or .json) and say what was removed."""
    check_output_path(dst)
    result = find_duplicates(src, fmt, near=near, ngram=ngram, num_perm=num_perm, skip_invalid=skip_invalid,
                             compare=compare)

    def kept():
        for source, number, record in raw_records(src):
            if number in result.groups:  # a kept record others repeat: remember it for the report
                item = parse_record(record, result.format, source)
                result.heads[number] = (location(source, number), snippet(TEXT_OF[result.compare](item)))
            if number not in result.removed_numbers and number not in result.invalid:
                yield record

    result.written = write_records(dst, kept())
    return result
