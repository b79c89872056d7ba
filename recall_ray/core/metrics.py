"""Scoring core of the evaluation job: references, answer extraction and per-task metrics.

Pure functions only (no Ray, no model): the evaluation job generates greedily, then calls
`references` on each raw test record, and `score_task` on the decoded generations.

The paper (RECALL, arXiv 2510.20479) reports accuracy for SST-2, MedMCQA and RACE and exact
match for SQuAD 2.0 and IWSLT 2017 en->fr, all in percent. Each task's scoring rule is one
entry of `TASK_METRICS` (metric names, an extractor, a scorer, a generation budget), so adding
a task is adding data, not a branch. The references come from the same `recall_ray.templates`
rule that built the training targets, so the evaluation expects exactly what the model was
trained to produce (label word, option letter, answer span or "impossible to answer", the
French translation).
"""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .templates import CHOICE_DELIMITER, MISSING, TaskDataError, gold_index, lookup, target, get_template, sample_id


class MetricError(ValueError):
    """A scoring problem (unknown task, record without a reference, mismatched inputs)."""


# ---------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------


def _sample_name(task: str, record: Mapping[str, Any], sample: str | None) -> str:
    """How error messages name a record: the caller's name, else the template's sample id."""
    if sample is not None:
        return str(sample)
    # sample_id falls back to the line number, which we do not know here: -1 marks that case.
    sid = sample_id(get_template(task), record, -1)
    return sid if sid != "-1" else "<record without id; pass sample=>"


def _dedupe(items: Sequence[str]) -> list[str]:
    """Items without repeats, first occurrence order kept (SQuAD annotators often agree)."""
    return list(dict.fromkeys(items))


def references(task: str, record: Mapping[str, Any], *, sample: str | None = None) -> list[str]:
    """All acceptable reference strings for one raw test record of `task`.

    The general-ability sets (arc_easy, piqa, hellaswag) give the correct option's 0-based
    position as a string ("1"), whatever the record's label convention (ARC's answerKey "B"
    or "2", PIQA's and HellaSwag's index): they are scored from every option's
    log-likelihood (`option_scores`), not from generated text.

    Single-answer tasks (sst2, ag_news, medmcqa, race, iwslt2017_en_fr) give the one target
    the training template produces (label word, option letter, French text), via the
    template's own rule. A list-valued target (SQuAD 2.0 `answers.text`) gives every
    annotator answer, deduplicated in order, or the template's `empty_target`
    ("impossible to answer") when the list is empty. Strings are returned as stored (no
    normalisation: the scorers normalise).

    `sample` names the record in error messages (e.g. "test.jsonl:17"); by default the
    template's sample id is used. Raises MetricError naming task, sample and field when the
    record has no usable reference: field missing or null, empty text, a label outside the
    template's labels (GLUE's unlabelled test split uses label -1), or an unknown task.
    """
    _check_task(task)
    if not isinstance(record, Mapping):
        raise MetricError(f"{task}: a record must be a dict (one JSON object), got {type(record).__name__}")
    tpl = get_template(task)
    name = _sample_name(task, record, sample)
    if tpl.choices is not None:
        # a general-ability set: the correct option's 0-based position, as a string
        try:
            return [str(gold_index(tpl, record))]
        except TaskDataError as err:
            raise MetricError(f"{task} sample {name}: no reference: {err}") from None
    value = lookup(record, tpl.target_field)

    if isinstance(value, list) and value:
        # Several annotators: every non-blank answer is acceptable (the training target used
        # only the first, see templates.target). List-valued targets are free text: no
        # template combines a list field with `labels`.
        texts = [str(item) for item in value if item is not None and str(item).strip()]
        if not texts:
            raise MetricError(
                f"{task} sample {name}: field {tpl.target_field!r} holds only empty answers; "
                "no reference to score against"
            )
        return _dedupe(texts)

    try:
        # Scalar field or empty list: exactly the training target.
        return [target(tpl, record)]
    except TaskDataError as err:
        hint = " (is this a split without labels?)" if value is MISSING or tpl.labels else ""
        raise MetricError(f"{task} sample {name}: no reference: {err}{hint}") from None


# ---------------------------------------------------------------------------------------
# Cleaning a generation
# ---------------------------------------------------------------------------------------

# End-of-sequence spellings that survive decoding when a tokenizer does not mark them as
# special (the caller decodes with skip_special_tokens=True, which removes the real ones).
EOS_MARKERS: tuple[str, ...] = (
    "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<|end|>",
    "<end_of_turn>", "<eos>", "<|eos|>",
)
# A model that echoes the prompt's last header ("### Response:") before answering.
_RESPONSE_HEADER = re.compile(r"^(?:\s*###\s*response\s*:)+", re.IGNORECASE)


def clean_generation(text: str) -> str:
    """The answer part of one greedy generation.

    Steps: drop a leading (repeated) "### Response:" header; cut at the first EOS-like
    marker (`EOS_MARKERS`); keep only the first non-blank line (every target is one line:
    labels, letters, SQuAD spans and the IWSLT French segments, none of which contain a
    newline in data/); strip surrounding whitespace. Whatever the model writes after its
    answer (a new "### Instruction:", a second answer) is therefore ignored.
    """
    if not isinstance(text, str):
        raise MetricError(f"a generation must be a string, got {type(text).__name__}")
    text = _RESPONSE_HEADER.sub("", text, count=1)
    cut = min((i for i in (text.find(m) for m in EOS_MARKERS) if i >= 0), default=len(text))
    text = text[:cut].strip()
    # After strip() the first line is non-blank unless the whole text is.
    return text.split("\n", 1)[0].strip()


# ---------------------------------------------------------------------------------------
# Extractors: cleaned generation -> prediction (None: no answer found, scored as wrong)
# ---------------------------------------------------------------------------------------


def label_extractor(labels: Sequence[str]) -> Callable[[str], str | None]:
    """An extractor returning the first of `labels` found in the text (canonical spelling).

    Matching is case-insensitive and on whole words: the label may not touch a letter,
    digit or underscore on either side ("positively" does not match "positive"; "Sci/Tech." matches).
    The first occurrence wins, so "positive, not negative" -> "positive" and "not positive"
    -> "positive" too: no negation handling, by design (the model is trained to emit the
    bare label). Strict: no synonyms ("science" is not "Sci/Tech").
    """
    canonical = {label.casefold(): label for label in labels}
    # Longest first so that a label that is a prefix of another cannot shadow it.
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)

    def extract(text: str) -> str | None:
        match = pattern.search(text)
        return canonical[match.group(0).casefold()] if match else None

    return extract


# An explicit cue ("answer is B", "Answer: (C)", "option D") takes priority over the first
# bare letter, so "A careful reading gives answer C" -> C. Cue words are case-insensitive; the
# option letter must be upper case everywhere (a lower-case "a" is an article, not an option).
_LETTER_CUE = re.compile(
    r"(?i:\b(?:answer|option|choice)\b)\s*(?:(?i:is)\b\s*)?[:=]?\s*[(\[]?([A-D])(?![A-Za-z0-9])"
)
# A standalone letter: not touching another letter, digit or apostrophe (so "AB", "D'Arcy",
# "A4" do not count); brackets and punctuation around it are fine: "B", "B.", "(B)", "B)".
_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-D])(?![A-Za-z0-9'])")


def extract_letter(text: str) -> str | None:
    """The option letter A-D chosen in `text`, or None when there is none.

    Rule (documented because prose answers are ambiguous): a letter after a cue word
    ("The answer is B", "Answer: B", "option (C)") wins; otherwise the first standalone
    capital A-D anywhere ("B", "B.", "(B)", "B) text", "I think C"). Consequences, on purpose
    and tested: "Because A is larger" -> A; "A good choice is B" -> B (the cue "choice is"
    wins); "A bit unclear, maybe B" -> A (without a cue the article "A" counts: a model that
    answers in prose instead of a letter is scored as the letter it wrote first); lower-case
    "b" -> None; "I don't know" -> None (wrong).
    """
    cue = _LETTER_CUE.search(text)
    if cue:
        return cue.group(1)
    match = _LETTER.search(text)
    return match.group(1) if match else None


def _identity(text: str) -> str:
    """Free-text tasks (SQuAD spans, translations): the cleaned generation is the answer."""
    return text


# ---------------------------------------------------------------------------------------
# Scorers: (predictions, references) -> {metric: value in percent}
# ---------------------------------------------------------------------------------------


def _percent(hits: float, n: int) -> float:
    return 100.0 * hits / n


def _label_hit(p: str | None, rs: list[str]) -> int:
    """1 when the extracted label equals a reference (case-insensitive); a None prediction
    (nothing extracted) is wrong, not dropped."""
    return int(p is not None and any(p.casefold() == r.casefold() for r in rs))


def _accuracy(preds: Sequence[str | None], refs: Sequence[list[str]]) -> dict[str, float]:
    """Accuracy in percent (`_label_hit` per sample; `extract_answer` shows which generations
    had no answer)."""
    return {"accuracy": _percent(sum(_label_hit(p, rs) for p, rs in zip(preds, refs)), len(preds))}


_SQUAD_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(text: str) -> str:
    """The official SQuAD normalisation (evaluate-v2.0.py `normalize_answer`).

    Lower-case, remove ASCII punctuation, remove the articles a/an/the, collapse whitespace;
    in that order, as in the official script.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _SQUAD_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact(prediction: str, reference: str) -> int:
    """1 when prediction and reference are equal after `normalize_squad`, else 0."""
    return int(normalize_squad(prediction) == normalize_squad(reference))


def squad_f1(prediction: str, reference: str) -> float:
    """Official SQuAD token F1 (0-1) of one prediction against one reference.

    Tokens are the whitespace-split normalised text; overlap counts repeated tokens with
    multiplicity. If either side has no tokens, F1 is 1 when both are empty, else 0.
    """
    pred_toks = normalize_squad(prediction).split()
    ref_toks = normalize_squad(reference).split()
    if not pred_toks or not ref_toks:
        return float(pred_toks == ref_toks)
    same = sum((collections.Counter(pred_toks) & collections.Counter(ref_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def _squad_golds(refs: list[str]) -> list[str]:
    # As the official v2 script: references that normalise to nothing are dropped, and a
    # question left with none is scored against "" (only an empty prediction matches).
    return [r for r in refs if normalize_squad(r)] or [""]


def _squad_hit(p: str | None, rs: list[str]) -> int:
    """SQuAD exact match of one sample: the max over its references."""
    return max(squad_exact(p or "", g) for g in _squad_golds(rs))


def _squad(preds: Sequence[str | None], refs: Sequence[list[str]]) -> dict[str, float]:
    """SQuAD 2.0 exact match and token F1 in percent, each the max over the references."""
    em = sum(_squad_hit(p, rs) for p, rs in zip(preds, refs))
    f1 = sum(max(squad_f1(p or "", g) for g in _squad_golds(rs)) for p, rs in zip(preds, refs))
    return {"exact_match": _percent(em, len(preds)), "f1": _percent(f1, len(preds))}


def normalize_translation(text: str) -> str:
    """Translation exact-match normalisation: strip, and collapse runs of whitespace to one
    space (the IWSLT segments keep the source's double spaces). Case, accents and
    punctuation are kept: only a verbatim translation counts."""
    return " ".join(text.split())


def _translation_hit(p: str | None, rs: list[str]) -> int:
    """Translation exact match of one sample (`normalize_translation` on both sides)."""
    return int(any(normalize_translation(p or "") == normalize_translation(r) for r in rs))


def _translation(preds: Sequence[str | None], refs: Sequence[list[str]]) -> dict[str, float]:
    """Exact match (see `normalize_translation`) and sacrebleu corpus BLEU, both 0-100.

    BLEU uses sacrebleu's defaults (13a tokenizer, exp smoothing, mixed case) on the cleaned
    generations and the raw references. Several references per sample become several
    reference streams, so every sample must have the same number of them.
    """
    try:
        import sacrebleu  # imported here: only translation scoring needs it
    except ImportError:  # pragma: no cover - depends on the environment
        raise MetricError("BLEU needs sacrebleu: pip install sacrebleu==2.6.0") from None
    preds = [p or "" for p in preds]
    hits = sum(_translation_hit(p, rs) for p, rs in zip(preds, refs))
    counts = {len(rs) for rs in refs}
    if len(counts) != 1:
        raise MetricError(
            f"BLEU needs the same number of references for every sample, got counts {sorted(counts)}"
        )
    streams = [[rs[i] for rs in refs] for i in range(counts.pop())]
    bleu = sacrebleu.corpus_bleu(preds, streams)
    return {"exact_match": _percent(hits, len(preds)), "bleu": float(bleu.score)}


# ---------------------------------------------------------------------------------------
# The task table
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMetric:
    """How one task is scored.

    metrics: the metric names `score_task` reports, the paper's (primary) metric first.
    extract: cleaned generation -> prediction, or None when no answer is found.
    score: (predictions, references per sample) -> {metric: value 0-100, ...}.
    max_new_tokens: suggested generation budget (greedy decoding stops at EOS earlier; the
        budget only bounds runaway generations, so it is set to cover the longest reference).
    hit: (prediction, references) -> 1 or 0, one sample's primary metric (the primary
        metric of every task is a mean of these), for paired comparisons of two models.
    by_options: scored from every option's log-likelihood (`option_scores`), never from a
        generation (the general-ability sets); the prediction is the chosen option's index.
    """

    metrics: tuple[str, ...]
    extract: Callable[[str], str | None]
    score: Callable[[Sequence[str | None], Sequence[list[str]]], dict[str, float]]
    max_new_tokens: int
    hit: Callable[[str | None, list[str]], int]
    by_options: bool = False


TASK_METRICS: dict[str, TaskMetric] = {
    # Label words are 1-3 tokens plus EOS.
    "sst2": TaskMetric(("accuracy",), label_extractor(["positive", "negative"]), _accuracy, 4, _label_hit),
    "ag_news": TaskMetric(
        ("accuracy",), label_extractor(["World", "Sports", "Business", "Sci/Tech"]), _accuracy, 6, _label_hit
    ),
    "medmcqa": TaskMetric(("accuracy",), extract_letter, _accuracy, 4, _label_hit),
    "race": TaskMetric(("accuracy",), extract_letter, _accuracy, 4, _label_hit),
    # Test answers reach 160 characters (5 of 227 first answers exceed 110): 48 tokens, not 32.
    "squad_v2": TaskMetric(("exact_match", "f1"), _identity, _squad, 48, _squad_hit),
    # Test references reach 437 characters (9 of 500 exceed 300, about 90-100 tokens): 128.
    "iwslt2017_en_fr": TaskMetric(("exact_match", "bleu"), _identity, _translation, 128, _translation_hit),
}


# ---------------------------------------------------------------------------------------
# General-ability sets: the option the model finds most likely, two ways
# ---------------------------------------------------------------------------------------

# How each metric ranks a record's options (core.loglik.choose): "acc" by the summed
# log-probability of the option's tokens, "acc_norm" by that sum over the option's length in
# characters, as lm-eval-harness computes them.
OPTION_RULES = {"acc": "sum", "acc_norm": "char"}


def option_chars(continuation: str) -> int:
    """An option's length for acc_norm: its text without the delimiter it is scored after
    (lm-eval's len(choice))."""
    return len(continuation) - len(CHOICE_DELIMITER)


def option_picks(token_logprobs: Sequence[Sequence[float]], continuations: Sequence[str]) -> dict[str, int]:
    """The option each metric of OPTION_RULES chooses (0-based; the first on a tie), from
    each option's token log-probabilities and the continuation it was scored as."""
    from .loglik import choose

    if len(token_logprobs) != len(continuations):
        raise MetricError(f"{len(token_logprobs)} options scored but {len(continuations)} options asked")
    chars = [option_chars(c) for c in continuations]
    return {m: choose(token_logprobs, rule, chars) for m, rule in OPTION_RULES.items()}


def option_scores(task: str, token_logprobs: Sequence[Sequence[Sequence[float]]],
                  continuations: Sequence[Sequence[str]], refs: Sequence[list[str]]) -> dict[str, float]:
    """A general-ability set's metrics in percent, the task's primary first, plus "n": per
    record, the option each rule chooses (`option_picks`) against the correct one (refs[i]
    = [its index as a string], `references`). Options may number differently per record."""
    spec = _check_task(task)
    if not spec.by_options:
        raise MetricError(f"{task} is scored from generations (score_task), not from option log-likelihoods")
    if not (len(token_logprobs) == len(continuations) == len(refs)):
        raise MetricError(f"{task}: {len(token_logprobs)} scored records, {len(continuations)} option lists and"
                          f" {len(refs)} references; they must pair up one to one")
    if not refs:
        raise MetricError(f"{task}: zero samples to score")
    hits = {m: 0 for m in spec.metrics}
    for lp, conts, rs in zip(token_logprobs, continuations, refs):
        picks = option_picks(lp, conts)
        for m in spec.metrics:
            hits[m] += _exact_hit(str(picks[m]), rs)
    return {**{m: _percent(hits[m], len(refs)) for m in spec.metrics}, "n": len(refs)}


def _exact_hit(p: str | None, rs: list[str]) -> int:
    """1 when the chosen option's index is the correct one's (both strings)."""
    return int(p is not None and p == rs[0])


def _by_options_only(preds, refs) -> dict[str, float]:
    raise MetricError("the general-ability sets are scored from option log-likelihoods: use option_scores")


# ARC-Easy and PIQA are reported by acc, HellaSwag by acc_norm (data/README.md); nothing is
# generated (the budget of 1 is never used).
TASK_METRICS.update({
    "arc_easy": TaskMetric(("acc", "acc_norm"), _identity, _by_options_only, 1, _exact_hit, by_options=True),
    "piqa": TaskMetric(("acc", "acc_norm"), _identity, _by_options_only, 1, _exact_hit, by_options=True),
    "hellaswag": TaskMetric(("acc_norm", "acc"), _identity, _by_options_only, 1, _exact_hit, by_options=True),
})


def _check_task(task: str) -> TaskMetric:
    try:
        return TASK_METRICS[task]
    except (KeyError, TypeError):
        raise MetricError(
            f"unknown task {task!r}; known tasks: {', '.join(sorted(TASK_METRICS))} "
            "(add an entry to recall_ray.metrics.TASK_METRICS)"
        ) from None


def primary_metric(task: str) -> str:
    """The metric the paper reports for `task` (accuracy, or exact_match for SQuAD 2.0 and
    IWSLT; BLEU and F1 are secondary)."""
    return _check_task(task).metrics[0]


def max_new_tokens(task: str) -> int:
    """Suggested `max_new_tokens` for greedy generation on `task`."""
    return _check_task(task).max_new_tokens


def extract_answer(task: str, generation: str) -> str | None:
    """The prediction scored for one raw generation (clean, then the task's extractor);
    None when no answer could be extracted. Useful to log next to each sample."""
    return _check_task(task).extract(clean_generation(generation))


def sample_hits(task: str, predictions: Sequence[str | None], refs: Sequence[list[str]]) -> list[int]:
    """Per sample, 1 or 0: whether the extracted prediction (`extract_answer`, as saved in
    predictions.jsonl) scores on the task's primary metric; their mean times 100 is that
    metric. For paired comparisons of two models on the same samples."""
    spec = _check_task(task)
    if len(predictions) != len(refs):
        raise MetricError(f"{task}: {len(predictions)} predictions but {len(refs)} reference lists")
    return [spec.hit(p, list(rs)) for p, rs in zip(predictions, refs)]


def score_task(task: str, generations: Sequence[str], refs: Sequence[list[str]]) -> dict[str, float]:
    """Score raw generations of `task` against per-sample reference lists.

    generations[i] is the decoded greedy output for sample i (special tokens skipped);
    refs[i] is `references(task, record_i)`. Returns exactly the task's metrics
    (`TASK_METRICS[task].metrics`, each 0-100) plus "n", the sample count: {"accuracy": 61.2,
    "n": 50}, {"exact_match": .., "f1": .., "n": ..} or {"exact_match": .., "bleu": .., "n": ..}.
    Raises MetricError for an unknown task, a length mismatch, no samples, or a refs entry
    that is not a non-empty list of strings.
    """
    spec = _check_task(task)
    if spec.by_options:
        raise MetricError(f"{task} is scored from every option's log-likelihood (option_scores), not from text")
    if isinstance(generations, str) or isinstance(refs, str):
        raise MetricError(f"{task}: generations and refs must be sequences, not a single string")
    if len(generations) != len(refs):
        raise MetricError(
            f"{task}: {len(generations)} generations but {len(refs)} reference lists; they must pair up one to one"
        )
    if not generations:
        raise MetricError(f"{task}: zero samples to score")
    for i, rs in enumerate(refs):
        # A bare string is a Sequence too; scoring it would compare against single characters.
        if not isinstance(rs, (list, tuple)) or not rs or not all(isinstance(r, str) for r in rs):
            raise MetricError(
                f"{task}: refs[{i}] must be a non-empty list of reference strings, got {rs!r}"
            )
    preds = [spec.extract(clean_generation(g)) for g in generations]
    result: dict[str, float] = dict(spec.score(preds, [list(rs) for rs in refs]))
    result["n"] = len(generations)
    return result


__all__ = [
    "EOS_MARKERS", "MetricError", "OPTION_RULES", "TASK_METRICS", "TaskMetric", "clean_generation", "extract_answer",
    "extract_letter", "label_extractor", "max_new_tokens", "option_chars", "option_picks", "option_scores",
    "sample_hits", "normalize_squad", "normalize_translation", "primary_metric", "references", "score_task",
    "squad_exact", "squad_f1",
]
