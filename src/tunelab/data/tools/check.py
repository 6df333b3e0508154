"""`tunelab data check`: every problem of every record, then a summary table.

Errors make a record unusable for training (the loaders would stop on it); warnings are
worth a look (control characters, a chat template's control strings such as `<|im_end|>` in
content, records longer than cutoff_len).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from tunelab.data.formats import RecordError
from tunelab.data.readers import iter_items, location
from tunelab.data.tools.common import item_messages, percent, table
from tunelab.data.tools.tokens import TokenCounter
from tunelab.data.types import Item
from tunelab.errors import TunelabError

# C0 controls except tab / newline / carriage return, DEL, and U+FFFD (the mark a
# wrong decoding left behind).
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
MAX_LISTED = 1000  # problems kept for the listing; counts stay exact beyond it


@dataclass
class Problem:
    where: str
    severity: str  # "error" | "warning"
    what: str
    fix: str = ""
    category: str = ""  # how the summary groups it; default: `what` without its particulars

    def line(self) -> str:
        return f"{self.where}: {self.what}: {self.fix}" if self.fix else f"{self.where}: {self.what}"

    @property
    def kind(self) -> str:
        if self.category:
            return self.category
        text = re.sub(r"^turn \d+ \([^)]*\): ", "", self.what)  # "turn 3 (user): two user turns" -> "two user turns"
        text = re.sub(r"\([^)]*\)", "(…)", text)
        text = re.sub(r"'[^']*'", "'…'", text)
        # Counts and positions become N; digits that are part of a name stay (UTF-8, UTF-16, Qwen2).
        return re.sub(r"(?<!\w)(?<![A-Za-z]-)\d+(?:\.\d+)?", "N", text)


@dataclass
class CheckReport:
    path: str
    format: str | None = None
    records: int = 0
    valid: int = 0
    problems: list[Problem] = field(default_factory=list)
    kinds: Counter = field(default_factory=Counter)  # (severity, kind) -> count
    cutoff_len: int | None = None
    sequences: int = 0
    over_cutoff: int = 0
    targets: int = 0
    cut_targets: int = 0

    @property
    def errors(self) -> int:
        return sum(n for (severity, _), n in self.kinds.items() if severity == "error")

    @property
    def warnings(self) -> int:
        return sum(n for (severity, _), n in self.kinds.items() if severity == "warning")

    def add(self, problem: Problem) -> None:
        self.kinds[problem.severity, problem.kind] += 1
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem)

    def summary(self) -> str:
        rows = [["records", self.records], ["valid", self.valid], ["errors", self.errors],
                ["warnings", self.warnings]]
        if self.cutoff_len:
            rows += [[f"sequences over cutoff_len={self.cutoff_len}", percent(self.over_cutoff, self.sequences)],
                     ["answer tokens truncation cuts", percent(self.cut_targets, self.targets)]]
        head = table([f"{self.path} ({self.format or 'unknown format'})", "count"], rows)
        if not self.kinds:
            return head
        kinds = [[severity, kind, n] for (severity, kind), n in self.kinds.most_common()]
        return head + "\n\n" + table(["severity", "problem", "records"], kinds)

    def to_json(self) -> dict:
        return {
            "path": self.path, "format": self.format, "records": self.records, "valid": self.valid,
            "errors": self.errors, "warnings": self.warnings, "cutoff_len": self.cutoff_len,
            "sequences": self.sequences, "over_cutoff": self.over_cutoff,
            "answer_tokens": self.targets, "answer_tokens_cut": self.cut_targets,
            "kinds": [{"severity": s, "problem": k, "count": n} for (s, k), n in self.kinds.most_common()],
            "problems": [vars(p) for p in self.problems],
        }


def control_characters(item: Item) -> list[str]:
    found = []
    for i, m in enumerate(item_messages(item), 1):
        match = CONTROL.search(m.content)
        if match:
            found.append(f"turn {i} ({m.role}) holds control character U+{ord(match.group()):04X} "
                         f"at character {match.start() + 1}")
    return found


def control_strings_in(item: Item, strings) -> list[str]:
    from tunelab.data.tokenize import forged_control_strings

    found = []
    for i, m in enumerate(item_messages(item), 1):
        held = forged_control_strings(m.content, strings)
        if held:
            found.append(f"turn {i} ({m.role}) holds the control string(s) {', '.join(held)}")
    return found


def _check_tokens(report: CheckReport, where: str, item: Item, counter: TokenCounter) -> None:
    try:
        counts = counter.count(item)
    except TunelabError as exc:
        report.add(Problem(where, "error", f"cannot be encoded: {exc.what}", exc.fix or ""))
        return
    for tokens in counts:
        report.sequences += 1
        report.targets += tokens.targets
        report.cut_targets += tokens.cut_targets
        if tokens.total > counter.cutoff_len:
            report.over_cutoff += 1
            effect = (f"truncation cuts {tokens.cut_targets} of {tokens.targets} answer tokens" if tokens.cut_targets
                      else "training shortens its oldest tool results / turns, no answer token is cut")
            what = f"{tokens.total} tokens, over cutoff_len={counter.cutoff_len}: {effect}"
            report.add(Problem(where, "warning", what,
                               "raise --cutoff-len, or shorten or split the record", "longer than cutoff_len"))


def check_file(path, fmt: str = "auto", *, counter: TokenCounter | None = None) -> CheckReport:
    """Check every record of one file (streamed); token checks when a `counter` is given."""
    from tunelab.data.tokenize import COMMON_CONTROL_STRINGS, control_strings

    report = CheckReport(str(path), cutoff_len=counter.cutoff_len if counter else None)
    strings = control_strings(counter.tokenizer) if counter else COMMON_CONTROL_STRINGS
    try:
        for source, number, file_format, item in iter_items(path, fmt):
            report.records += 1
            report.format = report.format or file_format
            where = location(source, number)
            if isinstance(item, RecordError):
                report.add(Problem(where, "error", item.what, item.fix or ""))
                continue
            report.valid += 1
            for what in control_characters(item):
                report.add(Problem(where, "warning", what, "remove it (often left by a copy from a PDF or terminal)",
                                   "control character in a turn"))
            for what in control_strings_in(item, strings):
                report.add(Problem(where, "warning", what,
                                   "tunelab trains on it as plain text, never as the template's control token; "
                                   "remove it if it was pasted from a rendered chat", "control string in a turn"))
            if counter is not None:
                _check_tokens(report, where, item, counter)
    except TunelabError as exc:  # the file as a whole cannot be read
        report.add(Problem(exc.where or str(path), "error", exc.what, exc.fix or ""))
    return report
