"""Read data files (JSONL, JSON, Parquet, CSV) into `Conversation` / preference items.

Three layers, each usable alone:
- `read_records(path)`: raw dicts with their location, streamed (JSONL, Parquet, CSV).
- `iter_items(path, fmt)`: each record normalised and validated, or the `RecordError`
  that says why it cannot be used (the `tunelab data` tools report them all).
- `load_conversations` / `load_preferences`: lists for training; stop at the first bad
  record, or with `skip_invalid=True` drop bad records and say how many.

Locations read `path:LINE` (JSONL) or `path:record N` (JSON array, Parquet, CSV), and
errors read `path:LINE: record N: what is wrong` plus the fix.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.formats import (
    FORMATS,
    Format,
    RecordError,
    check_format_name,
    detect_format,
    get_format,
    to_conversation,
    to_preference,
    to_record,
    validate_conversation,
    validate_preference,
)
from tunelab.data.types import Item, Message
from tunelab.errors import TunelabError

__all__ = [
    "read_records", "iter_items", "load_conversations", "iter_conversations", "load_preferences",
    "detect_format", "to_record", "Loaded", "RecordError", "FORMATS", "location", "HubOptions", "hub_options",
]

BOM = b"\xef\xbb\xbf"
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
SKIP_HINT = "or set skip_invalid=true to drop bad records"


# --- raw records -----------------------------------------------------------------------

def location(source: str, number: int) -> str:
    """`path:12: record 12`, or `path:record 3` where the source already names the record."""
    return source if ":record " in source else f"{source}: record {number}"


def _json_problem(exc: json.JSONDecodeError, text: str) -> tuple[str, str]:
    """(what, fix) for a JSON parse error, naming a trailing comma where that is the cause."""
    before = text[: exc.pos].rstrip()
    if before.endswith(",") and text[exc.pos: exc.pos + 1] in ("]", "}"):
        return (f"trailing comma before {text[exc.pos]!r} at line {exc.lineno} column {exc.colno}",
                "delete the comma after the last item: JSON does not allow it")
    if exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string"):
        return (f"the JSON ends early ({exc.msg}) at line {exc.lineno} column {exc.colno}",
                "the file looks truncated: write it again completely")
    return (f"malformed JSON ({exc.msg}) at line {exc.lineno} column {exc.colno}",
            "fix the JSON syntax at that position")


def _bad_bytes(raw: bytes) -> tuple[int, str, str] | None:
    """(byte offset, what, fix) of the first NUL byte or invalid UTF-8, or None if the text is clean."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        return nul, "a NUL byte", "the file is binary or UTF-16: re-save it as UTF-8 text"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (exc.start, f"bytes that are not UTF-8 ({raw[exc.start:exc.start + 4]!r})",
                "re-save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)")
    return None


def _decode(raw: bytes) -> str:
    """UTF-8 text of one line; RecordError for NUL bytes or invalid UTF-8."""
    bad = _bad_bytes(raw)
    if bad:
        offset, what, fix = bad
        raise RecordError(f"{what} at column {len(raw[:offset].decode('utf-8', 'replace')) + 1}", fix)
    return raw.decode("utf-8")


MAX_DEPTH = 64  # chat records nest a few levels; far deeper ones are broken or hostile
SURROGATE = re.compile(r"[\ud800-\udfff]")
NESTING_FIX = "flatten the record: a chat record nests only a few levels (messages -> turn -> content)"


class ContentError(RecordError):
    """A record that parses as JSON but holds what no model input can (lone surrogates, deep nesting)."""


def _json_loads(text: str):
    """json.loads, with nesting too deep for Python's recursion turned into a JSON error."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ContentError(f"JSON nested too deeply (over {MAX_DEPTH} levels)", NESTING_FIX) from None


def _content_problem(record) -> RecordError | None:
    """Deep nesting or a lone surrogate (`\\ud800`: half of a UTF-16 pair, often an emoji cut in
    two). JSON allows both, but no tokenizer or UTF-8 file can hold a lone surrogate."""
    stack = [(record, 0, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            return ContentError(f"JSON nested too deeply (over {MAX_DEPTH} levels)", NESTING_FIX)
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and SURROGATE.search(key):
                    return _surrogate_error(key, f"{path}.{key!a}".lstrip("."))
                stack.append((item, depth + 1, f"{path}.{key}".lstrip(".")))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, f"{path}[{i}]") for i, item in enumerate(value))
        elif isinstance(value, str) and SURROGATE.search(value):
            return _surrogate_error(value, path)
    return None


def _surrogate_error(text: str, path: str) -> RecordError:
    match = SURROGATE.search(text)
    return ContentError(f"{path or 'the record'} holds a lone surrogate \\u{ord(match.group()):04x} at character "
                       f"{match.start() + 1} (half of a UTF-16 pair, usually an emoji cut in two)",
                       "delete it or restore the full character; re-export the data as UTF-8 from its source")


def _parse_line(raw: bytes) -> dict | RecordError:
    try:
        text = _decode(raw)
        record = _json_loads(text)
    except RecordError as exc:
        return exc
    except json.JSONDecodeError as exc:
        what, fix = _json_problem(exc, text)
        return RecordError(what.replace(f"at line {exc.lineno} column", "at column"), fix)
    if not isinstance(record, dict):
        return RecordError(f"a record must be a JSON object, got {type(record).__name__}",
                           fix='write one {"key": value} object per line')
    return _content_problem(record) or record


def _jsonl(path: Path) -> Iterator[tuple[str, int, dict | RecordError]]:
    number = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if not raw.strip():
                continue
            number += 1
            yield f"{path}:{lineno}", number, _parse_line(raw)


def _file_error(path: Path, text: str, error: RecordError | json.JSONDecodeError) -> TunelabError:
    if isinstance(error, json.JSONDecodeError):
        what, fix = _json_problem(error, text)
        return TunelabError(what.split(" at line ")[0], where=f"{path}:{error.lineno}:{error.colno}", fix=fix)
    return TunelabError(error.what, where=str(path), fix=error.fix)


def _json_document(path: Path) -> Iterator[tuple[str, int, dict | RecordError]]:
    raw = path.read_bytes().removeprefix(BOM)
    bad = _bad_bytes(raw)
    if bad:
        offset, what, fix = bad
        line = raw.count(b"\n", 0, offset) + 1
        raise TunelabError(f"{what} on line {line}", where=f"{path}:{line}", fix=fix)
    text = raw.decode("utf-8")
    try:
        value = _json_loads(text)
    except json.JSONDecodeError as exc:
        raise _file_error(path, text, exc) from None
    except RecordError as exc:
        raise _file_error(path, text, exc) from None
    items = value if isinstance(value, list) else [value]
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict):
            item = RecordError(f"a record must be a JSON object, got {type(item).__name__}",
                               fix="make the file a JSON array of objects")
        yield f"{path}:record {number}", number, _content_problem(item) or item


def _json(path: Path) -> Iterator[tuple[str, int, dict | RecordError]]:
    """A JSON array (loaded whole), or one object per line (streamed like JSONL)."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(BOM).lstrip()
    if head.startswith(b"["):
        yield from _json_document(path)
        return
    lines = _jsonl(path)
    first = next(lines, None)
    if first is not None and isinstance(first[2], RecordError) and not isinstance(first[2], ContentError):
        # Not one object per line: maybe one pretty-printed object.
        yield from _json_document(path)
        return
    yield from itertools.chain([first] if first else [], lines)


def _text_lines(path: Path) -> Iterator[str]:
    """Decoded lines for the csv module; NUL / non-UTF-8 bytes stop with the line number
    (a CSV record may span lines, so a bad line cannot be skipped as one record)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(BOM)
            try:
                yield _decode(raw)
            except RecordError as exc:
                raise TunelabError(exc.what, where=f"{path}:{lineno}", fix=exc.fix) from None


def _csv(path: Path) -> Iterator[tuple[str, int, dict | RecordError]]:
    reader = csv.reader(_text_lines(path))
    header = next(reader, None)
    if not header:
        return
    number = 0
    for row in reader:
        if not row:
            continue
        number += 1
        source = f"{path}:record {number}"
        if len(row) != len(header):
            yield source, number, RecordError(
                f"line {reader.line_num} has {len(row)} fields but the header has {len(header)} "
                f"({', '.join(header)})",
                fix="give every row one value per column (empty is fine) and quote values that contain commas")
        else:
            yield source, number, dict(zip(header, row))


def _parquet(path: Path) -> Iterator[tuple[str, int, dict | RecordError]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:record {number}", number, row
    except (pa.ArrowInvalid, OSError) as exc:
        raise TunelabError(f"not a readable Parquet file ({exc})", where=str(path),
                           fix="write it again with pyarrow / pandas .to_parquet()") from None


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet}


# --- Hugging Face datasets: hub ids and save_to_disk folders ----------------------------

@dataclass(frozen=True)
class HubOptions:
    """How to read a `dataset: org/name` (config keys dataset_split, dataset_config, streaming)."""

    split: str = "train"
    config: str | None = None
    streaming: bool = False  # read records as they arrive: nothing downloaded past max_samples


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _datasets_module(name: str):
    try:
        import datasets
    except ImportError:
        raise TunelabError(f"{name} is a Hugging Face dataset, which needs the datasets package (not installed)",
                           where="dataset", fix="pip install 'tunelab[hub]' (or pip install datasets), "
                                                "or give a local .jsonl / .json / .parquet / .csv file") from None
    return datasets


def _hub_dataset(name: str, options: HubOptions):
    """The split of a hub dataset id (local cache first, hub.py) or of a `save_to_disk` folder."""
    from tunelab import hub

    datasets = _datasets_module(name)
    where = f"dataset {name}"
    try:
        if _is_saved_dataset(Path(name)):
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                data = data[options.split]
            return data.to_iterable_dataset() if options.streaming else data
        folder = hub.cached_snapshot(name, "dataset")
        if folder is None and hub.offline():
            raise hub.missing_offline(name, "dataset", where)
        return datasets.load_dataset(str(folder or name), options.config, split=options.split,
                                     streaming=options.streaming)
    except KeyError as exc:
        raise TunelabError(f"no split {options.split!r} ({exc})", where=where,
                           fix="set dataset_split to one of the dataset's splits, e.g. dataset_split=train") from None
    except ValueError as exc:  # an unknown split or config: datasets names the ones there are
        raise TunelabError(str(exc).splitlines()[0], where=where,
                           fix="set dataset_split / dataset_config to names the dataset has") from None
    except (OSError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise TunelabError(f"could not load it ({type(exc).__name__}: {str(exc).splitlines()[0]})", where=where,
                           fix="check the id, your connection (gated datasets need `hf auth login`), or give a "
                               "local file") from None


def _hub_records(name: str, options: HubOptions) -> Iterator[tuple[str, int, dict | RecordError]]:
    source = name if options.split == "train" else f"{name}[{options.split}]"
    count = 0
    for count, row in enumerate(_hub_dataset(name, options), 1):
        yield f"{source}:record {count}", count, dict(row)
    if count == 0:
        raise TunelabError("the dataset holds no records", where=source, fix="check dataset_split / dataset_config")


def is_hub_dataset(path) -> bool:
    """A `save_to_disk` folder, or an `org/name` id that is no local path: read through HF datasets."""
    from tunelab import hub

    p = Path(str(path)).expanduser()
    return _is_saved_dataset(p) or (not p.exists() and hub.is_hub_id(str(path)))


def read_records(path: str | os.PathLike, hub: HubOptions | None = None
                 ) -> Iterator[tuple[str, int, dict | RecordError]]:
    """Yield `(source, record number, record)`; a record that cannot be parsed comes as a
    RecordError (so a checker can go on). Problems with the whole file raise TunelabError.
    Hub ids and `save_to_disk` folders are read through HF datasets (`hub` says the split)."""
    if is_hub_dataset(path):
        yield from _hub_records(str(path), hub or HubOptions())
        return
    path = Path(path)
    if not path.exists():
        raise TunelabError("the data file does not exist", where=str(path),
                           fix="check the path (relative paths start from the current folder), or give a "
                               "Hugging Face dataset id as org/name")
    if path.is_dir():
        raise TunelabError("is a folder, not a data file", where=str(path), fix="name the file inside it")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise TunelabError(f"unknown file type {path.suffix or '(no extension)'!r}", where=str(path),
                           fix=f"use one of {', '.join(EXTENSIONS)} (rename the file if it is one of these)")
    if path.stat().st_size == 0:
        raise TunelabError("the file is empty", where=str(path), fix="write records into it, or drop it")
    count = 0
    for count, item in enumerate(reader(path), 1):
        yield item
    if count == 0:
        raise TunelabError("the file holds no records", where=str(path), fix="write records into it, or drop it")


# --- normalised items --------------------------------------------------------------------

def parse_record(record: dict, fmt: str | Format, source: str = "", system_prompt: str | None = None) -> Item:
    """One record of a known format -> a validated item (RecordError if it cannot be trained on)."""
    if get_format(fmt).kind == "conversation":
        conv = to_conversation(record, fmt, source)
        validate_conversation(conv)
        if system_prompt and not conv.is_plain_text and conv.messages[0].role != "system":
            conv.messages.insert(0, Message("system", system_prompt))
        return conv
    item = to_preference(record, fmt, source)
    validate_preference(item)
    return item


def iter_items(path: str | os.PathLike, fmt: str | Format = "auto", *, system_prompt: str | None = None,
               hub: HubOptions | None = None) -> Iterator[tuple[str, int, str | Format | None, Item | RecordError]]:
    """Yield `(source, number, format, item or RecordError)` for each record of one file.

    In auto mode the first record that shows its format fixes it for the whole file; a
    later record of another format is a RecordError naming both. `fmt` may also be a
    `Format` object (a dataset_info.json entry).
    """
    fmt = check_format_name(fmt) if isinstance(fmt, str) else fmt
    file_format = None if fmt == "auto" else fmt
    for source, number, record in read_records(path, hub):
        if isinstance(record, RecordError):
            yield source, number, file_format, record
            continue
        try:
            if fmt == "auto":
                found = detect_format(record)
                if file_format is None:
                    file_format = found
                elif found != file_format:
                    raise RecordError(f"looks like {found} but the file started as {file_format}",
                                      fix="keep one format per file (split it, or convert with `tunelab data convert`)")
            yield source, number, file_format, parse_record(record, file_format, source, system_prompt)
        except RecordError as exc:
            yield source, number, file_format, exc


class Loaded(list):
    """The items that loaded, plus `skipped` (how many were dropped) and `problems`
    (`location: what` of each dropped record) when `skip_invalid=True`."""

    def __init__(self, items: Iterable = ()):
        super().__init__(items)
        self.skipped = 0
        self.problems: list[str] = []


def _as_paths(paths) -> list:
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def resolve_path(entry, fmt: str | Format, dataset_dir: str | os.PathLike | None) -> tuple[Path, str | Format]:
    """A dataset entry -> (file, format): a file path as given, or a name looked up in
    dataset_dir/dataset_info.json (LLaMA-Factory's dataset registry, with its column mapping)."""
    path = Path(entry)
    if path.exists():
        return path, fmt
    if dataset_dir is None and not path.suffix and Path("data", "dataset_info.json").is_file():
        dataset_dir = "data"  # LLaMA-Factory's default, relative to the current folder
    if dataset_dir is not None:
        from tunelab.data.formats.llamafactory import resolve_dataset

        return resolve_dataset(str(entry), dataset_dir)
    if not path.suffix and os.sep not in str(entry):
        raise TunelabError(f"dataset {entry!r} is not a file", where="dataset",
                           fix="give a data file path; or, for a LLaMA-Factory dataset name, set dataset_dir to the "
                               "folder holding its dataset_info.json")
    return path, fmt


def _valid_items(paths: list, fmt: str, kind: str, *, skip_invalid: bool, system_prompt: str | None = None,
                 dataset_dir=None, hub: HubOptions | None = None, dropped: Loaded | None = None) -> Iterator[Item]:
    """The usable items of `paths`, read as they are asked for; a bad record raises, or with
    `skip_invalid` is counted into `dropped` (its `skipped` and `problems`)."""
    for entry in paths:
        path, path_format = resolve_path(entry, fmt, dataset_dir)
        for source, number, file_format, item in iter_items(path, path_format, system_prompt=system_prompt,
                                                            hub=hub):
            if file_format is not None and get_format(file_format).kind != kind:
                wanted = "conversations" if kind == "conversation" else "preference data"
                name = getattr(file_format, "name", file_format)
                raise TunelabError(f"holds {name} records, not {wanted}", where=str(path),
                                   fix="use stage=sft/pt for conversations and stage=dpo/simpo/orpo/kto "
                                       "for preference data")
            if not isinstance(item, RecordError):
                yield item
            elif skip_invalid:
                if dropped is not None:
                    dropped.skipped += 1
                    dropped.problems.append(f"{location(source, number)}: {item.what}")
            else:
                raise TunelabError(item.what, where=location(source, number),
                                   fix=f"{item.fix}; {SKIP_HINT}" if item.fix else SKIP_HINT)


def _load(paths, fmt: str, kind: str, *, skip_invalid: bool, max_samples: int | None,
          system_prompt: str | None = None, dataset_dir=None, hub: HubOptions | None = None) -> Loaded:
    loaded = Loaded()
    paths = _as_paths(paths)
    if not paths:
        raise TunelabError("no data files given", where="dataset", fix="set dataset=path/to/data.jsonl")
    items = _valid_items(paths, fmt, kind, skip_invalid=skip_invalid, system_prompt=system_prompt,
                         dataset_dir=dataset_dir, hub=hub, dropped=loaded)
    loaded.extend(itertools.islice(items, max_samples))  # nothing is read past max_samples
    if loaded.skipped:
        shown = "; ".join(loaded.problems[:3])
        print(f"tunelab: skipped {loaded.skipped} invalid record(s), kept {len(loaded)} (first: {shown})",
              file=sys.stderr)
    if not loaded:
        raise TunelabError("no usable records", where=", ".join(map(str, paths)),
                           fix="check the format (see `tunelab data check FILE`)")
    return loaded


def iter_conversations(paths, fmt: str = "auto", *, skip_invalid: bool = False, system_prompt: str | None = None,
                       dataset_dir=None, hub: HubOptions | None = None) -> Iterator:
    """The conversations of `paths` one at a time, read as they are asked for (a corpus larger than
    memory: `streaming: true` in continued pre-training); errors as `load_conversations`."""
    return _valid_items(_as_paths(paths), fmt, "conversation", skip_invalid=skip_invalid,
                        system_prompt=system_prompt, dataset_dir=dataset_dir, hub=hub)


def load_conversations(paths, fmt: str = "auto", *, skip_invalid: bool = False, max_samples: int | None = None,
                       system_prompt: str | None = None, dataset_dir=None, hub: HubOptions | None = None) -> Loaded:
    """All conversations of `paths` (a path, a hub dataset id, or a list), validated for training.

    Returns a `Loaded` list (`.skipped` and `.problems` tell what skip_invalid dropped).
    `system_prompt` is inserted where a conversation has no system message. With
    `dataset_dir`, names that are not files are looked up in its dataset_info.json.
    """
    return _load(paths, fmt, "conversation", skip_invalid=skip_invalid, max_samples=max_samples,
                 system_prompt=system_prompt, dataset_dir=dataset_dir, hub=hub)


def load_preferences(paths, fmt: str = "auto", *, skip_invalid: bool = False,
                     max_samples: int | None = None, dataset_dir=None, hub: HubOptions | None = None) -> Loaded:
    """All preference pairs / KTO examples of `paths`, validated (see `load_conversations`)."""
    return _load(paths, fmt, "preference", skip_invalid=skip_invalid, max_samples=max_samples,
                 dataset_dir=dataset_dir, hub=hub)


def hub_options(cfg) -> HubOptions:
    """The config's dataset_split / dataset_config / streaming (refused where no dataset is a hub one)."""
    options = HubOptions(cfg.dataset_split, cfg.dataset_config, cfg.streaming)
    local_stream = options.streaming and cfg.stage == "pt"  # continued pre-training streams local files too
    if options != HubOptions(streaming=local_stream) and not any(map(is_hub_dataset, cfg.dataset_paths)):
        raise TunelabError("dataset_split / dataset_config / streaming are set but no dataset is a Hugging Face "
                           "dataset", where="config", fix="drop them for local files (or use dataset: org/name)")
    return options
