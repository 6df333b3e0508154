"""LLaMA-Factory's `dataset_info.json`: a dataset named in the config is looked up there,
and its entry says the file, the formatting (alpaca / sharegpt), which columns hold what
and, for ShareGPT, which tags name the roles. `DatasetInfo` renames a record's columns
and tags to the registered format's own keys and reads it with that format, so every
check and error message stays the registered format's.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.data.formats.base import Format, RecordError, user_text
from tunelab.data.formats.chat import Alpaca, Text
from tunelab.data.formats.preference import KTO, Preference
from tunelab.data.formats.sharegpt import (
    ShareGPT,
    ShareGPTPreference,
    sharegpt_messages,
)
from tunelab.data.types import KTOExample
from tunelab.errors import TunelabError, nearest

INFO_FILE = "dataset_info.json"
# LLaMA-Factory's defaults for the two formattings (its data/README.md).
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools", "chosen": "chosen",
                    "rejected": "rejected", "kto_tag": "kto_tag"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# Our ShareGPT reader's own role names for each tag.
SHAREGPT_ROLE_OF_TAG = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
                        "function_tag": "function_call", "system_tag": "system"}
# The registered formats' keys -> the LLaMA-Factory column that fills them.
COLUMN_OF_KEY = {"instruction": "prompt", "text": "prompt", "prompt": "prompt", "output": "response",
                 "conversations": "messages"}
ENTRY_KEYS = ("file_name", "formatting", "ranking", "columns", "tags", "split", "num_samples")
REMOTE_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


class DatasetInfo(Format):
    """One dataset_info.json entry as a format: columns and tags renamed, then read by the
    registered format (alpaca, text, preference, kto, sharegpt, sharegpt_preference)."""

    def __init__(self, name: str, entry: dict):
        self.name = f"{name} (dataset_info.json)"
        self.formatting = entry.get("formatting", "alpaca")
        self.ranking = bool(entry.get("ranking", False))
        defaults = ALPACA_COLUMNS if self.formatting == "alpaca" else SHAREGPT_COLUMNS
        self.columns = {**defaults, **(entry.get("columns") or {})}
        self.tags = {**SHAREGPT_TAGS, **(entry.get("tags") or {})}
        given = entry.get("columns") or {}
        self.unpaired = "kto_tag" in given
        # LLaMA-Factory's pre-training entries map only the prompt column: {"prompt": "text"}.
        self.text_only = "prompt" in given and "response" not in given
        self.kind = "preference" if self.ranking or self.unpaired else "conversation"
        self.required = ()

    def read(self, record: dict, source: str = ""):
        if self.formatting == "sharegpt":
            return self._sharegpt(record, source)
        return self._alpaca(record, source)

    def _get(self, record: dict, column: str):
        return record.get(self.columns[column])

    def _alpaca(self, record: dict, source: str):
        prompt, query = self._get(record, "prompt"), self._get(record, "query")
        base = {"system": self._get(record, "system")}
        if self.ranking:
            fields = {"prompt": user_text(prompt or "", query or ""), "chosen": self._get(record, "chosen"),
                      "rejected": self._get(record, "rejected")}
            return self._as(Preference(), {**base, **fields}, source)
        if self.unpaired:
            fields = {"instruction": prompt, "input": query, "output": self._get(record, "response"),
                      "kto_tag": self._get(record, "kto_tag")}
            return self._as(KTO(), {**base, **fields}, source)
        if self.text_only and self.columns["response"] not in record:  # pre-training: the prompt column is the text
            return self._as(Text(), {"text": prompt}, source)
        fields = {"instruction": prompt, "input": query, "output": self._get(record, "response"),
                  "history": self._get(record, "history")}
        return self._as(Alpaca(), {**base, **fields}, source)

    def _sharegpt(self, record: dict, source: str):
        turns = self._get(record, "messages")
        fields = {"system": self._get(record, "system"), "tools": self._get(record, "tools"),
                  "conversations": [self._turn(t) for t in turns] if isinstance(turns, list) else turns}
        if self.ranking:
            fields |= {"chosen": self._turn(self._get(record, "chosen")),
                       "rejected": self._turn(self._get(record, "rejected"))}
            return self._as(ShareGPTPreference(), fields, source)
        if self.unpaired:  # the last turn is the judged answer
            fmt = ShareGPT()
            fmt.require(fields)
            messages = sharegpt_messages(fields)
            tag = self._get(record, "kto_tag")
            if not isinstance(tag, bool):
                raise RecordError(f"{self.columns['kto_tag']} must be true or false, got {tag!r}",
                                  fix="write the KTO tag as a JSON boolean")
            return KTOExample(messages[:-1], messages[-1], tag, source)
        return self._as(ShareGPT(), fields, source)

    def _turn(self, turn):
        """A turn with this dataset's tags -> {"from": <our ShareGPT role>, "value": ...}."""
        if not isinstance(turn, dict):
            return turn  # the ShareGPT reader names the problem
        role = turn.get(self.tags["role_tag"])
        ours = {self.tags[tag]: name for tag, name in SHAREGPT_ROLE_OF_TAG.items()}
        return {"from": ours.get(role, role), "value": turn.get(self.tags["content_tag"])}

    def _as(self, fmt: Format, fields: dict, source: str):
        record = {k: v for k, v in fields.items() if v is not None}
        missing = next((key for key in fmt.required if key not in record), None)
        if missing:  # name the dataset's own column, not the registered format's key
            role = COLUMN_OF_KEY.get(missing, missing)
            raise RecordError(f"missing column {self.columns.get(role, missing)!r} (the {role} column of "
                              f"{self.name})", fix=f"check the 'columns' of this dataset in {INFO_FILE}")
        return fmt.read(record, source)


def read_dataset_info(dataset_dir: str | Path) -> dict:
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise TunelabError(f"no {INFO_FILE} in {dataset_dir}", where=f"dataset_dir={dataset_dir}",
                           fix=f"point dataset_dir at the folder holding {INFO_FILE}, or give data file paths")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TunelabError(f"not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}",
                           fix="fix the JSON syntax on that line") from None
    if not isinstance(info, dict):
        raise TunelabError("must be a JSON object of dataset name -> entry", where=str(path),
                           fix='write {"my_data": {"file_name": "my_data.json"}}')
    return info


def resolve_dataset(name: str, dataset_dir: str | Path) -> tuple[Path, DatasetInfo]:
    """(data file, format) of a dataset named in dataset_dir/dataset_info.json."""
    info = read_dataset_info(dataset_dir)
    where = str(Path(dataset_dir) / INFO_FILE)
    if name not in info:
        hint = nearest(name, info)
        raise TunelabError(f"dataset {name!r} is neither a file nor a name in {INFO_FILE}", where=where,
                           fix=f"did you mean {hint!r}?" if hint else f"add an entry for it, or give a file path "
                                                                      f"(names there: {', '.join(sorted(info))})")
    entry = info[name]
    if not isinstance(entry, dict):
        raise TunelabError(f"the entry of {name!r} is not an object", where=where,
                           fix='write "NAME": {"file_name": "FILE.json", ...}')
    _check_entry(name, entry, where)
    return Path(dataset_dir) / entry["file_name"], DatasetInfo(name, entry)


def _check_entry(name: str, entry: dict, where: str) -> None:
    remote = [k for k in REMOTE_KEYS if k in entry]
    if remote and "file_name" not in entry:
        raise TunelabError(f"dataset {name!r} is remote ({remote[0]}); tunelab reads local files here",
                           where=where, fix="download it and give its file_name")
    unknown = [k for k in entry if k not in ENTRY_KEYS + REMOTE_KEYS]
    if unknown or "file_name" not in entry:
        raise TunelabError(f"dataset {name!r}: " + (f"unsupported key {unknown[0]!r}" if unknown else "no file_name"),
                           where=where, fix=f"an entry takes {', '.join(ENTRY_KEYS)}")
    if entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt"):
        raise TunelabError(f"dataset {name!r}: formatting {entry['formatting']!r} is not alpaca or sharegpt",
                           where=where, fix="use formatting: alpaca or sharegpt")
    if entry.get("split", "train") != "train" or "num_samples" in entry:
        raise TunelabError(f"dataset {name!r}: split / num_samples are not supported for local files",
                           where=where, fix="drop them; max_samples=N limits the records read")
