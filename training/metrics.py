"""Answer matching and metrics: classification, VQA, grounding (pixel IoU), captioning.

Everything here is pure: it scores strings and boxes, so it is tested with fake answers. IoU is
the plain area ratio in pixels (no `+1`: LHRS-Bot's IoU on 0-1 coordinates with a `+1` term
passed almost every box).
"""

from __future__ import annotations

import difflib
import logging
import re
import shutil
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
)
_WORD_NUMBERS = {w: i for i, w in enumerate(_NUMBER_WORDS)}
_ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """Lower case, no punctuation or articles, number words as digits, single spaces."""
    text = text.lower().replace("m²", " m2").replace("_", " ")
    text = re.sub(r"[^\w\s]", " ", text)
    words = [str(_WORD_NUMBERS.get(w, w)) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _stem_phrase(text: str) -> str:
    return " ".join(_singular(w) for w in normalize(text).split())


def match_choice(answer: str, choices: Sequence[str]) -> str | None:
    """Which of `choices` a free-text answer names, or None.

    Order: exact match; the choice named earliest in the answer (longest first at a tie, so
    "dense residential" beats "residential"); singular/plural-insensitive; a close spelling.
    """
    if not answer or not choices:
        return None
    norm = _stem_phrase(answer)
    by_norm = {_stem_phrase(c): c for c in choices}
    if norm in by_norm:
        return by_norm[norm]
    found: list[tuple[int, int, str]] = []
    padded = f" {norm} "
    for key, choice in by_norm.items():
        pos = padded.find(f" {key} ")
        if pos >= 0:
            found.append((pos, -len(key), choice))
    if found:
        return min(found)[2]
    # A whole-answer typo ("forrest") or a choice glued together ("bareland").
    joined = {k.replace(" ", ""): c for k, c in by_norm.items()}
    if norm.replace(" ", "") in joined:
        return joined[norm.replace(" ", "")]
    close = difflib.get_close_matches(norm, list(by_norm), n=1, cutoff=0.8)
    return by_norm[close[0]] if close else None


def first_number(text: str) -> int | None:
    for w in normalize(text).split():
        if w.isdigit():
            return int(w)
    return None


def yes_no(text: str) -> str | None:
    for w in normalize(text).split():
        if w in {"yes", "no"}:
            return w
        if w in {"true", "correct"}:
            return "yes"
        if w in {"false", "none", "not"}:
            return "no"
    return None


def vqa_correct(prediction: str, truth: str, qtype: str) -> bool:
    """Whether a free-text answer gives the expected answer for an RSVQA-style question."""
    if qtype in {"presence", "comparison"}:
        return yes_no(prediction) == truth
    if qtype in {"counting", "count"}:
        return first_number(prediction) == int(truth)
    if qtype == "rural_urban":
        words = normalize(prediction).split()
        hits = [w for w in words if w in {"rural", "urban"}]
        return bool(hits) and hits[0] == truth
    if qtype == "area":
        from rsvlm.perception import AREA_BUCKETS

        names = [name for _, name in AREA_BUCKETS] + ["more than 1000 m²"]
        return match_choice(prediction, names) == truth or normalize(prediction) == normalize(truth)
    return normalize(prediction) == normalize(truth)


# ------------------------------------------------------------------------------- boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Plain IoU of two (x1, y1, x2, y2) pixel boxes (no +1 term)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (
        max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
        + max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
        - inter
    )
    return inter / area if area > 0 else 0.0


def match_boxes(
    pred: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], threshold: float = 0.5
) -> int:
    """Greedy one-to-one matches with IoU >= threshold (highest IoU first)."""
    return len(match_pairs(pred, truth, threshold))


def match_pairs(
    pred: Sequence[Sequence[float]], truth: Sequence[Sequence[float]], threshold: float = 0.5
) -> dict[int, int]:
    """`match_boxes`' matches themselves: prediction index -> the truth index it matched."""
    pairs = sorted(
        ((box_iou(p, t), i, j) for i, p in enumerate(pred) for j, t in enumerate(truth)),
        reverse=True,
    )
    matched: dict[int, int] = {}
    used_t: set[int] = set()
    for iou, i, j in pairs:
        if iou < threshold:
            break
        if i in matched or j in used_t:
            continue
        matched[i] = j
        used_t.add(j)
    return matched


def count_scores(pairs: Sequence[tuple[int | None, int]]) -> dict[str, float | int | None]:
    """(predicted count or None when the answer names none, true count) -> exact-match share,
    mean absolute percentage error over true counts > 0 (an answer without a number counts as
    100 % off) and the share within 20 % of the truth (a true 0 needs a 0)."""
    if not pairs:
        return {"n": 0, "exact": None, "mape": None, "within_20pct": None}
    exact = sum(p == t for p, t in pairs)
    within = sum(p is not None and abs(p - t) <= 0.2 * t for p, t in pairs)
    errors = [1.0 if p is None else abs(p - t) / t for p, t in pairs if t > 0]
    return {"n": len(pairs), "exact": exact / len(pairs),
            "mape": sum(errors) / len(errors) if errors else None,
            "within_20pct": within / len(pairs),
            "no_number": sum(p is None for p, _ in pairs)}


def detection_scores(tp: int, n_pred: int, n_true: int) -> dict[str, float | int]:
    """Precision / recall / F1 from matched, predicted and true box counts."""
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
    return {"tp": tp, "predicted": n_pred, "true": n_true, "precision": precision,
            "recall": recall, "f1": f1}


# ------------------------------------------------------------------------------- captions


def _tokens(text: str) -> str:
    # pycocoevalcap's PTB tokenizer needs java; this lower-cased word split is what it amounts to
    # for template-like captions.
    return " ".join(re.findall(r"[a-z0-9]+", text.lower().replace("m²", " m2")))


def caption_scores(
    predictions: dict[str, str], references: dict[str, list[str]], meteor: bool = True
) -> dict[str, float | None]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr (the coco-caption implementations).

    METEOR runs the coco-caption Java jar; it is None (with a warning) when Java is missing.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise RuntimeError(
            "captioning metrics need pycocoevalcap: pip install -c constraints.txt pycocoevalcap"
        ) from exc
    ids = sorted(predictions)
    if not ids:
        raise ValueError("no captions to score")
    res = {i: [_tokens(predictions[i]) or "empty"] for i in ids}
    gts = {i: [_tokens(r) for r in references[i]] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out: dict[str, float | None] = {f"BLEU-{k + 1}": float(v) for k, v in enumerate(bleu)}
    out["METEOR"] = None
    if meteor and shutil.which("java"):
        try:
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                out["METEOR"] = float(scorer.compute_score(gts, res)[0])
            finally:
                # Stop the Java process now. Its __del__ takes the lock again, which a failed
                # compute_score leaves held, so give it a fresh one.
                scorer.meteor_p.kill()
                scorer.meteor_p.wait()
                scorer.lock = threading.Lock()
        except Exception as exc:  # noqa: BLE001 - METEOR is optional; report the others
            log.warning("METEOR failed (%s); reporting the other metrics", exc)
    elif meteor:
        log.warning("METEOR needs Java (not found); reported as null")
    out["ROUGE-L"] = float(rouge)
    out["CIDEr"] = float(cider)
    return out
