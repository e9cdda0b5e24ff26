"""The offline judge's restart detector (eval/restarts.py) on text written for these tests,
the held-out phrasings against the training bank's, and the labelled validation set
(real MiniLM embeddings, no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.labelled import label_agreement, read_labelled
from eval.judge_files import JudgeFileError
from eval.offline_judge import OfflineJudge
from eval.judging import JudgeItem
from eval.restarts import Restart, RestartDetector, clauses, load_prototypes, sentences, split_at

ROOT = Path(__file__).resolve().parents[1]
JUDGE_SET = ROOT / "eval" / "judge_set"

SOUP = "How do I make tomato soup?"
SOUP_ANSWER = ("Soften a chopped onion in olive oil, add two cans of tomatoes and a cup of stock, simmer for "
               "twenty minutes, then blend until smooth and season with salt.")
GLACIER = ("Glaciers are rivers of ice that creep down mountain valleys, grinding rock into fine powder and "
           "carving deep fjords as they slowly melt into the sea.")


@pytest.fixture(scope="module")
def detector() -> RestartDetector:
    return RestartDetector()


@pytest.fixture(scope="module")
def judge() -> OfflineJudge:
    return OfflineJudge()


def n_restarts(detector: RestartDetector, response: str, prompt: str = SOUP, concept: str = "glaciers") -> int:
    return len(detector.find([response], [prompt], [concept])[0])


# ------------------------------------------------------------------ segmentation (no model)


def test_clauses_join_interjections_and_keep_labels() -> None:
    text = "Hmm, no, that drifted. Second go: boil it, then, finally, serve."
    got = [text[c.start:c.end] for c in clauses(text)]
    # pieces of at most two words ("Hmm,", "no,", "boil it,", "then,") join the piece after
    # them; a label ending in a colon stands alone
    assert got == ["Hmm, no, that drifted.", "Second go:", "boil it, then, finally, serve."]
    assert [c.sentence for c in clauses(text)] == [0, 1, 1]


def test_sentences_keep_list_numbers_with_their_item() -> None:
    text = "1. Boil water.\n2. Add tea.\nDone"
    assert [text[a:b].strip() for a, b in sentences(text)] == ["1. Boil water.", "2. Add tea.", "Done"]
    assert sentences("") == [(0, 0)]


def test_split_at_keeps_announcements_apart_and_drops_empty_attempts() -> None:
    text = "Wait, no. Drift here. Sorry, lost it. Real answer."
    spans = [Restart(0, 9, 0.9, True, None), Restart(22, 37, 0.9, False, 0.5)]
    assert split_at(text, spans) == [("Drift here.", "Wait, no."), ("Real answer.", "Sorry, lost it.")]
    assert split_at("  ", []) == []


def test_prototypes_are_not_the_training_bank() -> None:
    bank = [json.loads(line)["phrase"] for line in
            (ROOT / "esr_train" / "resources" / "restart_phrases.jsonl").read_text().splitlines() if line.strip()]
    texts, labels = load_prototypes()
    assert sum(labels) >= 300 and len(labels) - sum(labels) >= 300
    own = {t.lower().strip() for t in texts}
    assert not [p for p in bank if p.lower().strip() in own]
    with pytest.raises(ValueError, match=":2: clause before any"):
        load_prototypes("# comment\norphan clause\n")


# ------------------------------------------------------------------ detection (MiniLM)


@pytest.mark.parametrize("restart", [
    "Erm, none of that is what a soup needs.",               # irrelevance, with a hesitation
    "I clearly let my thoughts slide off to somewhere icy.",  # admission of a wandering mind
    "Forgive the geology lecture.",                           # apology
    "Rewind:",                                                # a label announcing a fix
    "Forget the ice part, honestly.",                         # never mind the distraction
])
def test_paraphrased_restarts_between_drift_and_answer(detector, restart: str) -> None:
    assert n_restarts(detector, f"{GLACIER} {restart} {SOUP_ANSWER}") == 1


def test_mid_sentence_restart(detector) -> None:
    response = (f"{GLACIER[:-1]}, though none of this helps your soup, so from the beginning: {SOUP_ANSWER}")
    (found,) = detector.find([response], [SOUP], ["glaciers"])
    assert len(found) == 1 and "none of this helps your soup" in response[found[0].start:found[0].end]


def test_literal_restart_words_are_not_restarts(detector) -> None:
    story = ('Nora tasted the pot and frowned. "Hold on, that\'s wrong," she said, "we forgot the salt." '
             "She stirred in a pinch and the soup was perfect.")
    instructions = ("Simmer the tomatoes for twenty minutes. If the soup catches on the bottom, start over "
                    "with a clean pot. Whoops, if it splashes, wipe the stove at once. Blend and season.")
    assert n_restarts(detector, story, "Write a short story about cooking.", "") == 0
    assert n_restarts(detector, instructions, concept="") == 0
    assert n_restarts(detector, SOUP_ANSWER + " Actually, a pinch of sugar helps too.", concept="") == 0


def test_the_announcement_naming_the_distraction_is_not_scored(judge) -> None:
    announcement = "I was describing glaciers and fjords there, which has nothing to do with soup."
    (result,) = judge.judge([JudgeItem(SOUP, f"{GLACIER} {announcement} {SOUP_ANSWER}", "glaciers")])
    assert len(result.attempts) == 2
    assert result.attempts[1]["restart"] == announcement and result.attempts[1]["text"] == SOUP_ANSWER
    # scored alone, the recovery is a good answer (the announcement would drag it toward glaciers)
    alone = judge.judge([JudgeItem(SOUP, SOUP_ANSWER, "glaciers")])[0].attempts[0]["score"]
    assert result.attempts[1]["score"] == alone > 70 > result.attempts[0]["score"] + 40


# ------------------------------------------------------------------ independence from the bank

CONTEXTS = [
    ("How do you make a cup of tea?", "volcanoes",
     "Volcanoes are mountains where molten lava bursts out of the crater and ash rises high into the sky.",
     "Boil fresh water, pour it over a tea bag in a cup, steep it for three minutes and add milk if you like."),
    ("How can I save money on groceries?", "the ocean",
     "The ocean is vast and blue, and its waves roll over coral reefs where bright fish swim among the seaweed.",
     "Plan your meals for the week, make a shopping list, buy store brands and compare unit prices."),
    ("How do I start running?", "dinosaurs",
     "Dinosaurs roamed the earth millions of years ago, and the giant Tyrannosaurus had tiny arms and huge teeth.",
     "Start with short run-walk sessions three times a week, wear good shoes and add a few minutes each week."),
]


def _found_rate(judge: OfflineJudge, path: Path) -> float:
    phrases = [json.loads(line)["phrase"] for line in path.read_text().splitlines() if line.strip()]
    items = [JudgeItem(prompt, f"{drift} {p.replace('{subject}', concept)} {answer}", concept)
             for p in phrases for prompt, concept, drift, answer in CONTEXTS]
    return sum(len(r.attempts) == 2 for r in judge.judge(items)) / len(items)


def test_held_out_phrasings_found_as_often_as_the_banks(judge) -> None:
    bank = _found_rate(judge, ROOT / "esr_train" / "resources" / "restart_phrases.jsonl")
    held_out = _found_rate(judge, JUDGE_SET / "heldout_restarts.jsonl")
    assert bank >= 0.9 and abs(bank - held_out) <= 0.05, (bank, held_out)


# ------------------------------------------------------------------ the labelled set


def test_labelled_rows_are_checked(tmp_path: Path) -> None:
    good = {"id": "a", "source": "hand:x", "prompt": "p", "concept": "", "response": "One. Wait, no. Two.",
            "attempts": ["One.", "Two."], "restarts": ["Wait, no."], "direction": "same"}
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(good) + "\n")
    assert read_labelled([tmp_path])[0]["id"] == "a"
    for change, words in ((dict(attempts=["One.", "Three."]), ":1: attempt text 'Three.'"),
                          (dict(restarts=[]), ":1: 'restarts' must hold one fewer"),
                          (dict(direction=None), ":1: 'direction' must be one of"),
                          (dict(attempts=["Two.", "One."]), "not in the response after the text before it")):
        path.write_text(json.dumps({**good, **change}) + "\n")
        with pytest.raises(JudgeFileError, match=words):
            read_labelled([path])
    path.write_bytes(b'{"id": "\xff"}\n')
    with pytest.raises(JudgeFileError, match=":1: not UTF-8"):
        read_labelled([path])


def test_label_agreement_hand_computed() -> None:
    def row(n, source="hand:a", direction=None, concept="c"):
        attempts = [f"a{i}" for i in range(n)]
        return {"source": source, "concept": concept, "attempts": attempts, "restarts": attempts[1:],
                "direction": direction}

    def judged(*scores, error=None):
        return {"attempts": [{"score": s} for s in scores], "error": error}

    labelled = [row(2, direction="better"), row(2, direction="worse"), row(1), row(1, "model:m", concept=""),
                row(3, "model:m", "better")]
    out = [judged(10, 90), judged(10, 90), judged(50, 60), judged(80, 20), judged(0, 1, error="x")]
    result = label_agreement(labelled, out)
    assert result["all"]["multi_attempt"] == {"k": 2, "n": 4, "rate": 0.5}
    assert result["all"]["direction"] == {"k": 1, "n": 2, "rate": 0.5}
    assert result["all"]["false_restarts_unsteered"] == {"k": 1, "n": 1, "rate": 1.0}
    assert result["all"]["errors"] == 1 and result["by_family"]["model"]["n"] == 1
    assert result["by_source"]["hand:a"]["exact_count"]["k"] == 2


def test_shipped_labelled_set_meets_the_goals(judge) -> None:
    rows = read_labelled([JUDGE_SET])
    assert sum(r["source"].startswith("hand:") for r in rows) >= 100
    assert sum(r["source"].startswith("model:") for r in rows) >= 250
    results = judge.judge([JudgeItem(r["prompt"], r["response"], r.get("concept", "")) for r in rows])
    result = label_agreement(rows, [r.to_record() for r in results])
    hand, model, disputed = (result["by_family"][f] for f in ("hand", "model", "disputed"))
    # the goals on hand-written cases and on a random sample of real model responses
    for family in (hand, model):
        assert family["multi_attempt"]["rate"] >= 0.97 and family["exact_count"]["rate"] >= 0.93, family
        assert family["false_restarts_unsteered"]["k"] == 0, family
    assert hand["direction"]["rate"] >= 0.9, hand
    # responses two judges disagreed on, chosen for being hard: a floor against regressions
    assert disputed["multi_attempt"]["rate"] >= 0.85, disputed
