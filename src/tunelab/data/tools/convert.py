"""`tunelab data convert`: any supported format -> any other, refusing (with the record's
location) whatever the target cannot hold rather than dropping it silently."""

from __future__ import annotations

import os
from collections.abc import Iterator

from tunelab.data.formats import FORMATS, RecordError, check_format_name, to_record
from tunelab.data.readers import iter_items, location
from tunelab.data.tools.common import check_output_path, write_records
from tunelab.errors import TunelabError


def converted(path, target: str, fmt: str = "auto", *, skip_invalid: bool = False,
              counter: dict | None = None) -> Iterator[dict]:
    """Records of `path` rewritten as `target` records (a generator: nothing held in memory)."""
    for source, number, _fmt, item in iter_items(path, fmt):
        try:
            if isinstance(item, RecordError):
                raise item
            yield to_record(item, target)
        except RecordError as exc:
            if skip_invalid:
                if counter is not None:
                    counter["skipped"] = counter.get("skipped", 0) + 1
                continue
            raise TunelabError(exc.what, where=location(source, number),
                               fix=f"{exc.fix}; or pass --skip-invalid to leave such records out") from None


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, target: str, fmt: str = "auto", *,
                 skip_invalid: bool = False) -> tuple[int, int]:
    """Write `src` as `target` records to `dst` (.jsonl or .json); returns (written, skipped)."""
    check_format_name(target, FORMATS)
    check_output_path(dst)
    counter: dict = {}
    written = write_records(dst, converted(src, target, fmt, skip_invalid=skip_invalid, counter=counter))
    return written, counter.get("skipped", 0)
