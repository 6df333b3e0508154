"""The hotel-booking reference task (the FineTuningLab Qwen2.5 LoRA recipe's evaluation).

Each row is a dialogue prefix and the next turn. The prompt ends at `<|im_start|>`, so the
model itself chooses the role: its output is `search\\n{json arguments}` or
`assistant\\n{reply}`. Search rows score slot precision / recall / F1 (pooled over rows) on
the predicted arguments; a prediction that is not a search, or whose JSON does not parse,
counts as an empty dict. Assistant rows score character-level BLEU-4 of the text after the
role line. Both as shared/README.md describes the recipe.
"""

from __future__ import annotations

import json

from tunelab.data.readers import load_conversations
from tunelab.errors import TunelabError
from tunelab.evaluate import breakdown as bd
from tunelab.evaluate.metrics import (
    SlotCounts,
    prf,
    sentence_bleu4_char,
    sentence_bleu4_chars,
    slot_counts,
    slot_scores,
)
from tunelab.evaluate.tasks.base import EvalSample, Task, is_empty, perplexity_scores


def split_role(text: str) -> tuple[str, str]:
    """`"search\\n{...}"` -> ("search", "{...}"): the first line is the role the model chose."""
    role, _, body = text.lstrip().partition("\n")
    return role.strip(), body


def predicted_arguments(prediction: str) -> dict | str:
    """What the model searched for: the JSON text after a `search` role line, else {}."""
    role, body = split_role(prediction)
    return body if role == "search" else {}


def reference_meta(reference: str, where: str) -> dict:
    """What scoring needs from a reference `role\nbody`: the role, and a search's arguments."""
    role, body = split_role(reference)
    meta: dict = {"role": role}
    if role == "search":
        try:
            meta["arguments"] = json.loads(body)
        except ValueError:
            raise TunelabError("the reference search turn is not JSON", where=where,
                               fix='a search reference is "search\\n{...json arguments...}"') from None
    return meta


class HotelTask(Task):
    name = "hotel"
    default_template = "hotel"
    default_metrics = ("slots", "bleu")
    metrics = ("slots", "bleu", "ppl")
    json_marker = "search\n"  # only search turns are JSON; replies stay free text
    json_keys = ("type", "price_range_lower", "price_range_upper", "rating_range_lower", "rating_range_upper",
                 "facilities", "name")  # every slot the hotel set uses (shared/README.md)

    def load(self, path, fmt: str = "auto", limit: int | None = None) -> list[EvalSample]:
        fmt = "hotel" if fmt == "auto" else fmt
        if fmt != "hotel":
            raise TunelabError(f"the hotel task reads hotel rows, not {fmt}", where=str(path),
                               fix="drop --format, or use --task generic for other formats")
        return self.samples_from(load_conversations(path, "hotel", max_samples=limit))

    def samples_from(self, convs) -> list[EvalSample]:
        samples = []
        for conv in convs:
            *context, response = conv.messages
            meta = reference_meta(f"{response.role}\n{response.content}", conv.source)
            samples.append(EvalSample(source=conv.source, prompt=context, target=response,
                                  reference=f"{response.role}\n{response.content}", meta=meta))
        return samples

    def score_row(self, row: dict, metrics: tuple[str, ...]) -> dict:
        if "role" not in row.get("meta", {}):  # predictions written by another tool: the reference says it
            row["meta"] = reference_meta(row["reference"], row.get("source") or "--predictions")
        prediction, meta = row["prediction"], row["meta"]
        role, body = split_role(prediction)
        # "assistant\n" and nothing after it is an empty answer, not a short one.
        scores: dict = {"role_correct": role == meta["role"], "empty": is_empty(body)}
        if meta["role"] == "search":
            counts = slot_counts(predicted_arguments(prediction), meta["arguments"])
            scores.update(slot_correct=counts.correct, slot_predicted=counts.predicted,
                          slot_expected=counts.expected)
        else:
            scores["bleu4"] = 100.0 * sentence_bleu4_char(body, split_role(row["reference"])[1])
        return scores

    def aggregate(self, rows: list[dict], metrics: tuple[str, ...]) -> dict:
        search = [r for r in rows if r["meta"]["role"] == "search"]
        reply = [r for r in rows if r["meta"]["role"] != "search"]
        out: dict = {"samples": len(rows), "search_rows": len(search), "assistant_rows": len(reply)}
        if "slots" in metrics:
            out.update(slot_scores([predicted_arguments(r["prediction"]) for r in search],
                                   [r["meta"]["arguments"] for r in search]))
        if "bleu" in metrics:
            out["bleu4"] = sentence_bleu4_chars([split_role(r["prediction"])[1] for r in reply],
                                                [split_role(r["reference"])[1] for r in reply])
        out["role_accuracy"] = 100.0 * sum(r["scores"]["role_correct"] for r in rows) / max(len(rows), 1)
        out["empty_predictions"] = sum(r["scores"]["empty"] for r in rows)
        if "ppl" in metrics:
            out.update(perplexity_scores(rows))
        return out

    def reward(self, prompt: str, completion: str, reference: str) -> float:
        """0 for the wrong role; else 0.2, plus for a search 0.2 for valid JSON and 0.6 x the row's
        slot F1 (1 when both sides name no slot), for a reply 0.8 x its char BLEU-4 / 100.
        The reference is the turn as the model should write it (`search\n{...}` / `assistant\n...`)."""
        role, body = split_role(reference)
        meta = {"role": role}
        if role == "search":
            meta["arguments"] = json.loads(body) if bd.is_json_object(body) else {}
        row = {"prediction": completion, "reference": reference, "meta": meta}
        scores = self.score_row(row, ("slots", "bleu"))
        if not scores["role_correct"]:
            return 0.0
        if role != "search":
            return 0.2 + 0.8 * scores["bleu4"] / 100
        valid = bd.is_json_object(split_role(completion)[1])
        nothing = scores["slot_predicted"] == scores["slot_expected"] == 0
        f1 = 1.0 if nothing and valid else _row_f1({"scores": scores}) / 100
        return 0.2 + 0.2 * valid + 0.6 * f1

    def mistake(self, row: dict) -> str | None:
        """Wrong role, malformed search JSON, or any missing / extra slot. Replies in the
        right role are not judged: many wordings are right, and BLEU cannot tell them apart."""
        role, body = split_role(row["prediction"])
        if role != row["meta"]["role"]:
            return "wrong role"
        if role == "search":
            if not bd.is_json_object(body):
                return "malformed JSON"
            s = row["scores"]
            if not s["slot_correct"] == s["slot_predicted"] == s["slot_expected"]:
                return "wrong slots"
        return None

    def breakdown(self, rows: list[dict]) -> dict:
        """Per-slot P/R/F1, malformed search JSON, role confusion, lengths, worst rows."""
        search = [r for r in rows if r["meta"]["role"] == "search"]
        reply = [r for r in rows if r["meta"]["role"] != "search"]
        predicted_search = [r for r in rows if split_role(r["prediction"])[0] == "search"]
        malformed = sum(not bd.is_json_object(split_role(r["prediction"])[1]) for r in predicted_search)
        confusion: dict[str, int] = {}
        for r in rows:
            said = split_role(r["prediction"])[0]
            said = said if said in ("search", "assistant") else "other"
            if said != r["meta"]["role"]:
                key = f"{r['meta']['role']}_answered_as_{said}"
                confusion[key] = confusion.get(key, 0) + 1
        wrong = sum(confusion.values())
        body = lambda text: split_role(text)[1]  # noqa: E731
        return {
            "field_name": "slot",
            "fields": bd.field_scores([(predicted_arguments(r["prediction"]), r["meta"]["arguments"])
                                       for r in search]),
            "format": {"search_predictions": len(predicted_search), "malformed_json": malformed,
                       "malformed_json_rate": bd.rate(malformed, len(predicted_search))},
            "roles": {"wrong_role": wrong, "wrong_role_rate": bd.rate(wrong, len(rows)), **confusion},
            "lengths": {"search": bd.lengths(search, body), "assistant": bd.lengths(reply, body)},
            "worst": {"search": bd.worst(search, _row_f1),
                      "assistant": bd.worst([r for r in reply if "bleu4" in r["scores"]],
                                            lambda r: r["scores"]["bleu4"])},
            "worst_score": {"search": "slot F1 of the row", "assistant": "char BLEU-4"},
        }


def _row_f1(row: dict) -> float:
    s = row["scores"]
    return prf(SlotCounts(s["slot_correct"], s["slot_predicted"], s["slot_expected"]))["f1"]
