"""Answer metrics of `ponder-pt sft` (pure functions).

* `exact_match` / `token_f1`: SQuAD's (v1.1 evaluate script) answer normalisation: lowercase,
  drop punctuation, drop the articles a/an/the, collapse whitespace; F1 over the normalised
  tokens; the best over several gold answers (`best_over`).
* `numeric_match`: numbers compared as numbers ("42" = "42.0" = "42." = "+42", "1,000" =
  "1000"); the answer after a GSM8k-style "####" marker when there is one; non-numbers fall
  back to `exact_match`.
* `choice_accuracy`: log-likelihood multiple choice (argmax of each row's choice scores, the
  first on ties).
* Pause-awareness: `after_last_pause` keeps only the tokens after the last `<pause>` of a
  sequence; generation starts after the M appended pauses and every prediction is read from
  this tail only.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Callable, Optional, Sequence

METRICS = ("exact_match", "f1", "numeric_match", "accuracy")
_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_GROUPED = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")


def normalize_answer(text: str) -> str:
    """SQuAD: lower, remove punctuation, remove articles, fix whitespace (in that order)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # SQuAD v2: an empty answer matches only an empty answer
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def final_answer(text: str) -> str:
    """The text after the last GSM8k "####" marker, else the text itself."""
    return text.rsplit("####", 1)[1] if "####" in text else text


def parse_number(text: str) -> Optional[Decimal]:
    """A number written alone ("42", "-3.50", "1,000", "$12", "7."), else None."""
    s = final_answer(text).strip().rstrip(".").strip()
    s = s.removeprefix("$").strip()
    if "," in s:
        if not _GROUPED.match(s):
            return None
        s = s.replace(",", "")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def numeric_match(prediction: str, gold: str) -> float:
    g = parse_number(gold)
    if g is None:
        return exact_match(prediction, gold)
    p = parse_number(prediction)
    return float(p is not None and p == g)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match, "f1": token_f1, "numeric_match": numeric_match}


def best_over(score: Callable[[str, str], float], prediction: str,
              golds: Sequence[str]) -> float:
    """The best score of `prediction` against any of `golds` (SQuAD's metric_max_over...)."""
    return max(score(prediction, g) for g in golds) if golds else 0.0


def choice_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Fraction of rows whose highest-scoring choice is the label (ties: the first)."""
    if not labels:
        return 0.0
    right = sum(int(max(range(len(s)), key=lambda i: (s[i], -i)) == y)
                for s, y in zip(scores, labels))
    return right / len(labels)


def after_last_pause(ids: Sequence[int], pause_id: Optional[int]) -> list[int]:
    """The tokens after the last pause (all of them when there is none)."""
    ids = list(ids)
    if pause_id is None or pause_id not in ids:
        return ids
    return ids[len(ids) - ids[::-1].index(pause_id):]


def generative_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict:
    """Mean exact_match, f1 and numeric_match of predictions against their gold lists."""
    n = max(1, len(predictions))
    return {name: sum(best_over(fn, p, g) for p, g in zip(predictions, golds)) / n
            for name, fn in SCORERS.items()}
