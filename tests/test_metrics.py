"""Scoring core (recall_ray.metrics): every number is checked against a value worked out by
hand in the test (or, for BLEU, against sacrebleu called directly on the same strings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu

from recall_ray.core.metrics import (
    TASK_METRICS,
    MetricError,
    clean_generation,
    extract_answer,
    extract_letter,
    max_new_tokens,
    normalize_squad,
    normalize_translation,
    primary_metric,
    references,
    sample_hits,
    score_task,
    squad_exact,
    squad_f1,
)
from recall_ray.core.templates import TEMPLATES, load_task_records

DATA = Path(__file__).resolve().parents[1] / "data"
TASKS = ["sst2", "squad_v2", "medmcqa", "race", "iwslt2017_en_fr", "ag_news"]


def first_test_records(task: str, count: int = 1) -> list[dict]:
    """The first `count` raw records of data/<task>/test.jsonl."""
    with open(DATA / task / "test.jsonl", encoding="utf-8") as fh:
        return [json.loads(next(fh)) for _ in range(count)]


# --- the table -------------------------------------------------------------------------


def test_every_template_task_is_scored_and_vice_versa():
    from recall_ray.core.templates import TEMPLATE_SETS

    general = {"arc_easy", "piqa", "hellaswag"}  # scored from option log-likelihoods (tests/test_general.py)
    assert set(TASK_METRICS) == set(TASKS) | general
    assert {t for t, m in TASK_METRICS.items() if m.by_options} == general
    assert set(TEMPLATES) == set(TASKS) | general | {name for names in TEMPLATE_SETS.values() for name in names.values()}
    assert all(task in TASKS for names in TEMPLATE_SETS.values() for task in names)


def test_primary_metric_is_the_papers_metric():
    assert {t: primary_metric(t) for t in TASKS} == {
        "sst2": "accuracy", "ag_news": "accuracy", "medmcqa": "accuracy", "race": "accuracy",
        "squad_v2": "exact_match", "iwslt2017_en_fr": "exact_match",
    }
    # the general-ability sets as data/README.md reports them: HellaSwag length-normalised
    assert {t: primary_metric(t) for t in ("arc_easy", "piqa", "hellaswag")} == {
        "arc_easy": "acc", "piqa": "acc", "hellaswag": "acc_norm"}


def test_max_new_tokens_suggestions():
    assert {t: max_new_tokens(t) for t in TASKS} == {
        "sst2": 4, "ag_news": 6, "medmcqa": 4, "race": 4, "squad_v2": 48, "iwslt2017_en_fr": 128,
    }


# --- clean_generation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("positive", "positive"),
        ("  positive  ", "positive"),
        ("positive</s>", "positive"),
        ("B<|eot_id|>garbage", "B"),
        ("Paris<|endoftext|>\n### Instruction:\nmore", "Paris"),
        ("Sports\n### Instruction:\nClassify ...", "Sports"),  # a model that keeps going
        ("\n\n  C\nD", "C"),  # blank lines before the answer are skipped
        ("### Response:\nnegative", "negative"),  # an echoed header
        ("### Response: ### Response:\nnegative", "negative"),
        ("### response:   World", "World"),
        ("Le chat dort.  Il rêve.", "Le chat dort.  Il rêve."),  # inner spacing kept
        ("", ""),
        ("</s>", ""),
    ],
)
def test_clean_generation(raw, expected):
    assert clean_generation(raw) == expected


def test_every_test_reference_is_one_line():
    # clean_generation keeps one line for every task: check that no reference spans lines.
    for task in TASKS:
        for line in (DATA / task / "test.jsonl").read_text(encoding="utf-8").splitlines():
            for ref in references(task, json.loads(line)):
                assert "\n" not in ref and "\r" not in ref, (task, ref)


# --- SQuAD normalisation, EM, F1 -------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat!", "cat"),
        ("  An  apple, a day. ", "apple day"),
        ("theater of the absurd", "theater of absurd"),  # "the" only as a whole word
        ("Impossible to answer.", "impossible to answer"),
        ("U.S.A.", "usa"),
        ("Katyń  Museum", "katyń museum"),
        ("the", ""),
    ],
)
def test_normalize_squad(text, expected):
    assert normalize_squad(text) == expected


def test_squad_exact_official_examples():
    assert squad_exact("Impossible to answer.", "impossible to answer") == 1
    assert squad_exact("the Eiffel Tower", "Eiffel Tower") == 1
    assert squad_exact("Eiffel", "Eiffel Tower") == 0
    assert squad_exact("impossible", "impossible to answer") == 0


def test_squad_f1_by_hand():
    # pred tokens [cat, sat], ref tokens [cat, sat, on, mat]: P = 2/2, R = 2/4, F1 = 2/3.
    assert squad_f1("The cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # pred [x, x, y], ref [x, y]: overlap counts x once, so 2 common; P = 2/3, R = 1, F1 = 0.8.
    assert squad_f1("x x y", "x y") == pytest.approx(0.8)
    assert squad_f1("dog", "cat") == 0.0
    assert squad_f1("", "") == 1.0  # both empty agree
    assert squad_f1("the", "cat") == 0.0  # prediction normalises to nothing
    assert squad_f1("Cat.", "the cat") == 1.0


def test_score_squad_by_hand():
    gens = [
        "Fort Beauséjour",  # EM 1, F1 1
        "Katyń",  # matches the first of two references: EM 1, F1 1
        "the Museum of Katyń",  # vs "Katyń Museum": EM 0; [museum, of, katyń] vs [katyń, museum]: P 2/3, R 1, F1 0.8
        "Impossible to answer.</s>",  # EM 1, F1 1
        "Warsaw",  # unanswerable question answered: EM 0, F1 0
    ]
    refs = [
        ["Fort Beauséjour"],
        ["Katyń", "Katyń Museum"],
        ["Katyń Museum"],
        ["impossible to answer"],
        ["impossible to answer"],
    ]
    out = score_task("squad_v2", gens, refs)
    assert out == {"exact_match": pytest.approx(100 * 3 / 5), "f1": pytest.approx(100 * 3.8 / 5), "n": 5}


def test_squad_reference_normalising_to_nothing_is_dropped():
    # As the official script: "The" is dropped; with no usable gold left, only "" matches.
    assert score_task("squad_v2", ["cat"], [["The", "a cat"]])["exact_match"] == 100.0
    assert score_task("squad_v2", ["the"], [["The"]])["exact_match"] == 100.0  # "" == ""
    assert score_task("squad_v2", ["cat"], [["The"]])["exact_match"] == 0.0


# --- letters ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        ("[C]", "C"),
        ("D: Tubulin", "D"),
        ("Answer: B", "B"),
        ("answer:B", "B"),
        ("The answer is B", "B"),
        ("The correct answer is (C).", "C"),
        ("Option D", "D"),
        ("I think C", "C"),
        ("A careful reading gives answer C", "C"),  # the cue beats an earlier "A"
        ("A good choice is B", "B"),  # "choice is" is a cue
        ("Because A is larger", "A"),  # no cue: first standalone capital
        ("A bit unclear, maybe B", "A"),  # the article counts when no cue: documented
        ("A and B", "A"),
        ("I don't know", None),
        ("", None),
        ("b", None),  # lower case is never an option letter
        ("E", None),  # only four options
        ("AB", None),  # not standalone
        ("D'Arcy", None),
        ("Vitamin B12", None),
    ],
)
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


@pytest.mark.parametrize("task", ["medmcqa", "race"])
def test_letter_accuracy_hand_count(task):
    gens = ["B", "(C)</s>", "The answer is D", "I don't know", "A.\nB"]
    refs = [["B"], ["C"], ["A"], ["D"], ["A"]]
    # right, right, wrong (D vs A), wrong (nothing found, still counted), right: 3 of 5.
    assert score_task(task, gens, refs) == {"accuracy": 60.0, "n": 5}


# --- labels -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("positive", "positive"),
        ("Negative.", "negative"),
        ("POSITIVE", "positive"),
        ("The sentiment is negative", "negative"),
        ("positive, not negative", "positive"),  # first found
        ("not positive", "positive"),  # no negation handling, by design
        ("positively", None),  # whole words only
        ("neutral", None),
        ("", None),
    ],
)
def test_sst2_label(text, expected):
    assert extract_answer("sst2", text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("World", "World"),
        ("sports", "Sports"),
        ("Sci/Tech", "Sci/Tech"),
        ("sci/tech.", "Sci/Tech"),
        ("Topic: Business", "Business"),
        ("SPORTS world", "Sports"),
        ("Science", None),  # strict: no synonyms
        ("Sci/Technology", None),
        ("Worldwide", None),
        ("Tech", None),
    ],
)
def test_ag_news_label(text, expected):
    assert extract_answer("ag_news", text) == expected


def test_sst2_accuracy_hand_count():
    gens = ["positive", "Negative.", "I think it is positive", "neutral", "positively negative"]
    refs = [["positive"], ["negative"], ["negative"], ["positive"], ["negative"]]
    # right, right, wrong, wrong (nothing found), right ("positively" is not a label word): 3 of 5.
    assert score_task("sst2", gens, refs) == {"accuracy": 60.0, "n": 5}


def test_ag_news_accuracy_hand_count():
    gens = ["Sci/Tech", "World", "science", "Business"]
    refs = [["Sci/Tech"], ["Sports"], ["Sci/Tech"], ["Business"]]
    assert score_task("ag_news", gens, refs) == {"accuracy": 50.0, "n": 4}


# --- translation -------------------------------------------------------------------------


def test_normalize_translation():
    assert normalize_translation("  Il fait  beau.\t") == "Il fait beau."
    assert normalize_translation("Il fait beau") != normalize_translation("il fait beau.")


def test_translation_em_and_bleu_match_sacrebleu():
    preds = ["Le chat est sur le tapis.", "Il fait beau aujourd'hui.", "Merci beaucoup."]
    refs = ["Le chat est assis sur le tapis.", "Il fait  beau aujourd'hui.", "Merci."]
    expected_bleu = sacrebleu.corpus_bleu(preds, [refs]).score
    out = score_task("iwslt2017_en_fr", preds, [[r] for r in refs])
    # Only the second is exact (double space collapsed): 1 of 3.
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["bleu"] == pytest.approx(expected_bleu)
    assert 0 < out["bleu"] < 100
    assert out["n"] == 3 and set(out) == {"exact_match", "bleu", "n"}


def test_translation_perfect_match_is_100():
    refs = ["Le chat est assis sur le tapis.", "Merci beaucoup pour votre attention."]
    out = score_task("iwslt2017_en_fr", [r + "</s>" for r in refs], [[r] for r in refs])
    assert out == {"exact_match": 100.0, "bleu": pytest.approx(100.0), "n": 2}


def test_translation_several_references_are_reference_streams():
    preds = ["Le chat dort.", "Bonjour à tous."]
    refs = [["Le chat dort bien.", "Le chat dort."], ["Salut tout le monde.", "Bonjour à vous."]]
    expected = sacrebleu.corpus_bleu(preds, [[r[0] for r in refs], [r[1] for r in refs]]).score
    out = score_task("iwslt2017_en_fr", preds, refs)
    assert out["bleu"] == pytest.approx(expected)
    assert out["exact_match"] == 50.0  # the first matches its second reference


# --- references() on the shipped test data ------------------------------------------------


def test_references_first_test_record_of_each_task():
    sst2, = first_test_records("sst2")
    assert sst2["label"] == 1 and references("sst2", sst2) == ["positive"]

    ag, = first_test_records("ag_news")
    assert ag["label"] == 2 and references("ag_news", ag) == ["Business"]

    med, = first_test_records("medmcqa")
    assert med["cop"] == 3 and references("medmcqa", med) == ["D"]

    race, = first_test_records("race")
    assert race["answer"] == "D" and references("race", race) == ["D"]

    mt, = first_test_records("iwslt2017_en_fr")
    expected_fr = "Les libéraux vont détester les grandes banques, l'industrie du pétrole et Dick Cheney."
    assert mt["fr"] == expected_fr and references("iwslt2017_en_fr", mt) == [expected_fr]

    squad = first_test_records("squad_v2", 9)
    assert squad[0]["answers"]["text"] == [] and references("squad_v2", squad[0]) == ["impossible to answer"]
    # Five identical annotator answers -> one reference.
    assert squad[2]["answers"]["text"] == ["Fort Beauséjour"] * 5
    assert references("squad_v2", squad[2]) == ["Fort Beauséjour"]
    # Repeats dropped, first-seen order kept.
    assert squad[8]["answers"]["text"] == ["Katyń", "Katyń Museum", "Katyń Museum"]
    assert references("squad_v2", squad[8]) == ["Katyń", "Katyń Museum"]


@pytest.mark.parametrize("task", TASKS)
def test_training_targets_score_100(task):
    # The trained target format must be read back as correct: the template's own target as
    # the generation (plus an EOS spelling) scores 100 on every metric.
    path = str(DATA / task / "test.jsonl")
    rendered = load_task_records(path, task, max_samples=40)
    raw = first_test_records(task, 40)
    out = score_task(task, [r["target"] + "</s>" for r in rendered], [references(task, r) for r in raw])
    # Exactly the task's metrics plus n: the evaluation job reads every other key as a metric.
    assert set(out) == set(TASK_METRICS[task].metrics) | {"n"}
    for metric in TASK_METRICS[task].metrics:
        assert out[metric] == pytest.approx(100.0), (task, metric, out)
    assert out["n"] == 40


@pytest.mark.parametrize("task", TASKS)
def test_sample_hits_average_to_the_primary_metric(task):
    """Per-sample hits (for paired comparisons) are the primary metric sample by sample: a
    mix of right answers, other samples' answers and empty generations, whose hits are
    known by construction and whose mean is score_task's primary value."""
    rendered = load_task_records(str(DATA / task / "test.jsonl"), task, max_samples=30)
    refs = [references(task, r) for r in first_test_records(task, 30)]
    gens = []
    for i, r in enumerate(rendered):
        gens.append(r["target"] if i % 3 == 0 else "" if i % 3 == 1 else rendered[(i + 7) % 30]["target"])
    preds = [extract_answer(task, g) for g in gens]
    hits = sample_hits(task, preds, refs)
    assert set(hits) <= {0, 1}
    assert all(hits[i] == 1 for i in range(0, 30, 3))  # its own target
    assert sum(hits[i] for i in range(1, 30, 3)) == 0  # an empty generation scores nothing
    assert 100.0 * sum(hits) / len(hits) == pytest.approx(score_task(task, gens, refs)[primary_metric(task)])


# --- errors -------------------------------------------------------------------------------


def test_unknown_task_lists_known_ones():
    for call in (
        lambda: score_task("sst-2", ["x"], [["y"]]),
        lambda: references("sst-2", {"label": 1}),
        lambda: primary_metric("sst-2"),
        lambda: max_new_tokens("sst-2"),
        lambda: extract_answer("sst-2", "x"),
    ):
        with pytest.raises(MetricError, match=r"unknown task 'sst-2'; known tasks: ag_news, arc_easy, hellaswag, iwslt2017_en_fr, medmcqa"):
            call()


def test_metric_error_is_a_value_error():
    assert issubclass(MetricError, ValueError)


def test_length_mismatch():
    with pytest.raises(MetricError, match="2 generations but 1 reference lists"):
        score_task("sst2", ["positive", "negative"], [["positive"]])


def test_zero_samples():
    with pytest.raises(MetricError, match="zero samples"):
        score_task("race", [], [])


@pytest.mark.parametrize("bad", ["positive", [], [None], ("positive", 1)])
def test_refs_entry_must_be_a_nonempty_list_of_strings(bad):
    with pytest.raises(MetricError, match=r"refs\[1\] must be a non-empty list of reference strings"):
        score_task("sst2", ["positive", "negative"], [["positive"], bad])


def test_single_string_instead_of_sequences():
    with pytest.raises(MetricError, match="not a single string"):
        score_task("sst2", "positive", [["positive"]])


def test_generation_must_be_a_string():
    with pytest.raises(MetricError, match="a generation must be a string, got NoneType"):
        score_task("sst2", [None], [["positive"]])


def test_bleu_needs_equal_reference_counts():
    with pytest.raises(MetricError, match="same number of references"):
        score_task("iwslt2017_en_fr", ["a", "b"], [["a"], ["b", "c"]])


def test_reference_missing_field_names_task_sample_field():
    with pytest.raises(MetricError, match=r"sst2 sample test.jsonl:3: no reference: record has no field 'label'"):
        references("sst2", {"sentence": "fine"}, sample="test.jsonl:3")
    with pytest.raises(MetricError, match=r"sst2 sample <record without id; pass sample=>: .*'label'"):
        references("sst2", {"sentence": "fine", "label": None})


def test_reference_unlabelled_split():
    # GLUE's test split marks missing labels with -1.
    with pytest.raises(MetricError, match=r"sst2 sample .*has value -1.*split without labels"):
        references("sst2", {"sentence": "fine", "label": -1})


def test_reference_sample_id_from_template():
    race, = first_test_records("race")
    del race["answer"]
    with pytest.raises(MetricError, match=r"race sample high23365.txt#0: no reference: record has no field 'answer'"):
        references("race", race)


def test_reference_empty_translation():
    mt, = first_test_records("iwslt2017_en_fr")
    mt["fr"] = "  "
    with pytest.raises(MetricError, match=r"iwslt2017_en_fr sample 2435:51: no reference: field 'fr' is empty"):
        references("iwslt2017_en_fr", mt)


def test_reference_squad_without_answers():
    squad, = first_test_records("squad_v2")
    sid = squad["id"]
    with pytest.raises(MetricError, match=rf"squad_v2 sample {sid}: no reference: record has no field 'answers.text'"):
        references("squad_v2", {**squad, "answers": None})
    with pytest.raises(MetricError, match=rf"squad_v2 sample {sid}: field 'answers.text' holds only empty answers"):
        references("squad_v2", {**squad, "answers": {"text": ["", " "], "answer_start": [0, 0]}})


def test_reference_record_must_be_a_dict():
    with pytest.raises(MetricError, match="a record must be a dict"):
        references("sst2", ["fine", 1])
