"""Any conversation data set: the last assistant turn is the reference, what precedes it the prompt.

Metrics (`--metrics`): `bleu` (smoothed sentence BLEU-4 averaged over rows, as the hotel recipe
computes it: over words for text written with spaces, over characters for CJK text, the unit
named in `bleu4_unit`; plus sacrebleu corpus BLEU), `rouge` (ROUGE-1/2/L F1; by character for CJK text), `em`
(exact match after stripping), `ppl` (perplexity of the reference tokens under teacher
forcing). Empty predictions score 0 and are counted, never dropped.
"""

from __future__ import annotations

import json

from tunelab.data.readers import load_conversations
from tunelab.errors import TunelabError
from tunelab.evaluate import breakdown as bd
from tunelab.evaluate.metrics import bleu_unit, corpus_bleu, exact_match, rouge_f1, sentence_bleu4
from tunelab.evaluate.tasks.base import EvalSample, Task, is_empty, perplexity_scores

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
MISTAKE_BLEU = 30.0  # below this BLEU-4 (x100) a text answer counts as wrong for mine-pairs


def _reference_turn(conv) -> int:
    targets = [i for i, m in enumerate(conv.messages) if m.is_target()]
    if conv.is_plain_text or not targets:
        raise TunelabError("the row has no assistant turn to use as the reference", where=conv.source,
                           fix="evaluate conversations that end with an assistant answer "
                               "(plain-text rows have none; use --metrics ppl on chat data instead)")
    last = targets[-1]
    if not conv.messages[last].content.strip():
        raise TunelabError("the reference (last assistant turn) is empty", where=conv.source,
                           fix="remove the row or fill in the answer")
    if last == 0:
        raise TunelabError("the row has an answer but no prompt before it", where=conv.source,
                           fix="give each answer the user turn it replies to")
    return last


class GenericTask(Task):
    name = "generic"
    default_metrics = ("bleu", "rouge")
    metrics = ("bleu", "rouge", "em", "ppl")

    def load(self, path, fmt: str = "auto", limit: int | None = None) -> list[EvalSample]:
        return self.samples_from(load_conversations(path, fmt, max_samples=limit))

    def samples_from(self, convs) -> list[EvalSample]:
        samples = []
        for conv in convs:
            last = _reference_turn(conv)
            target = conv.messages[last]
            samples.append(EvalSample(source=conv.source, prompt=conv.messages[:last], target=target,
                                  reference=target.content, tools=conv.tools))
        return samples

    def score_row(self, row: dict, metrics: tuple[str, ...]) -> dict:
        prediction, reference = row["prediction"], row["reference"]
        scores: dict = {"empty": is_empty(prediction)}
        if "bleu" in metrics:
            scores["bleu4"] = 100.0 * sentence_bleu4(prediction, reference, unit=bleu_unit(reference))
        if "rouge" in metrics:
            scores.update({k: 100.0 * v for k, v in rouge_f1(prediction, reference).items()})
        if "em" in metrics:
            scores["exact_match"] = exact_match([prediction], [reference])
        return scores

    def reward(self, prompt: str, completion: str, reference: str) -> float:
        """Sentence BLEU-4 of the completion against the reference (words, or characters for CJK
        text: the headline bleu4's unit), in [0, 1]."""
        return sentence_bleu4(completion, reference, unit=bleu_unit(reference))

    def aggregate(self, rows: list[dict], metrics: tuple[str, ...]) -> dict:
        preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
        out: dict = {"samples": len(rows)}
        if "bleu" in metrics:
            out["bleu4"] = sum(r["scores"]["bleu4"] for r in rows) / max(len(rows), 1)
            units = sorted({bleu_unit(ref) for ref in refs})
            out["bleu4_unit"] = {"char": "characters (CJK text)", "word": "words"}[units[0]] if len(units) == 1 \
                else "words, characters for rows with CJK text"
            out["corpus_bleu"] = corpus_bleu(preds, refs)
        if "rouge" in metrics:
            for key in ROUGE_KEYS:
                out[key] = sum(r["scores"][key] for r in rows) / max(len(rows), 1)
        if "em" in metrics:
            out["exact_match"] = exact_match(preds, refs)
        if "ppl" in metrics:
            out.update(perplexity_scores(rows))
        out["empty_predictions"] = sum(r["scores"]["empty"] for r in rows)
        return out

    def mistake(self, row: dict) -> str | None:
        """A JSON answer that is malformed or has other fields; a text answer that is not the
        reference (after normalisation) and scores BLEU-4 below MISTAKE_BLEU."""
        prediction, reference = row["prediction"], row["reference"]
        if bd.is_json_object(reference):
            if not bd.is_json_object(prediction):
                return "malformed JSON"
            return "wrong fields" if json.loads(prediction) != json.loads(reference) else None
        if exact_match([prediction], [reference]) == 100.0:
            return None
        low = 100.0 * sentence_bleu4(prediction, reference, unit=bleu_unit(reference)) < MISTAKE_BLEU
        return "low BLEU" if low else None

    def breakdown(self, rows: list[dict]) -> dict:
        """Lengths and worst rows; for answers that are JSON objects, per-key P/R/F1 and the
        malformed-JSON rate (the generic form of the hotel task's per-slot view)."""
        score_name = next((k for k in ("bleu4", "rougeL", "exact_match") if rows and k in rows[0]["scores"]), None)
        out: dict = {"lengths": {"all": bd.lengths(rows)}}
        if score_name:
            out["worst"] = {"all": bd.worst(rows, lambda r: float(r["scores"][score_name]))}
            out["worst_score"] = {"all": score_name}
        structured = [r for r in rows if bd.is_json_object(r["reference"])]
        if structured and 2 * len(structured) >= len(rows):
            malformed = sum(not bd.is_json_object(r["prediction"]) for r in structured)
            out["field_name"] = "field"
            out["fields"] = bd.field_scores([(r["prediction"], json.loads(r["reference"])) for r in structured])
            out["format"] = {"json_answers": len(structured), "malformed_json": malformed,
                             "malformed_json_rate": bd.rate(malformed, len(structured))}
        return out
