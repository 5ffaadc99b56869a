"""The extractive second reading (vertical.reader): candidate spans, and when a span replaces the
model's own answer."""

from __future__ import annotations

import numpy as np
import pytest

from vertical.evidence import Sentence
from vertical.prompting import Source
from vertical.reader import answer_head, candidates, is_factoid, reconsider


def source(number: int, *sentences: str) -> Source:
    text = " ".join(sentences)
    spans, at = [], 0
    for s in sentences:
        spans.append(Sentence(at, at + len(s), s))
        at += len(s) + 1
    return Source(number, "Title", "doc.md", 0, len(text), text, doc_id=f"doc{number}", sentences=tuple(spans))


EVIDENCE = [source(1, "Transfuse below 70 g/L; with acute coronary syndrome the threshold is 80 g/L.",
                   "The standard apixaban dose is 5 mg twice daily, reduced if creatinine is 133 micromol/L or more."),
            source(2, "Hotel stays outside London are capped at GBP 180 a night.")]


def texts(question: str) -> set[str]:
    return {c.text for group in candidates(question, EVIDENCE) for c in group}


def test_candidates_are_whole_answers_of_the_asked_type():
    found = texts("What is the standard apixaban dose?")
    assert {"5 mg twice daily", "5 mg", "80 g/L", "GBP 180", "133 micromol/L"} <= found
    # a number is not cut from its unit or its currency, and a span does not end on a stopword
    assert not {"5", "133", "80", "180", "5 mg twice daily, reduced if"} & found
    # a span made only of the question's own words does not answer it
    assert "standard apixaban dose" not in found and "apixaban" not in found
    # a question that asks for an amount gets spans that hold a number
    assert all(any(ch.isdigit() for ch in t) for t in texts("How much is the hotel cap outside London?"))
    assert "Hotel stays" in texts("Which stays are capped?")


def test_factoid_questions_and_answer_heads():
    assert is_factoid("What mean arterial pressure should vasopressors aim for?")
    assert is_factoid("In septic shock, how long may antibiotics wait?")
    assert not is_factoid("Why is the dose reduced?") and not is_factoid("Is apixaban safe in pregnancy?")
    assert not is_factoid("How does the stop-loss procedure work?")
    assert answer_head("70 g/L [1]. Answer: 70 g/L [1].") == "70 g/L"
    assert answer_head("12 years old, love. He started at twelve.") == "12 years old"
    assert answer_head("1.2 to 2 g over 20 minutes") == "1.2 to 2 g over 20 minutes"


class ScoredPrefill:
    """A prefilled model whose path scores come from a table of texts (one token per text)."""

    def __init__(self, scores: dict[str, float]):
        self.vocabulary: dict[str, int] = {}
        self.scores = scores
        self.calls = 0
        self.first = np.zeros(10_000)

    def tokenize(self, text: str) -> list[int]:
        return [self.vocabulary.setdefault(text, len(self.vocabulary))]

    def follow(self, paths):
        self.calls += 1
        names = {v: k for k, v in self.vocabulary.items()}
        return [[self.scores.get(names[p[0]], -20.0)] for p in paths]


def ask(scores: dict[str, float], answer: str, question: str = "What is the threshold in acute coronary syndrome?",
        unsupported: bool = False):
    model = ScoredPrefill(scores)
    chosen = reconsider(lambda: model, model.tokenize, question, EVIDENCE, answer, unsupported)
    return chosen, model


def test_a_span_replaces_the_answer_only_when_the_model_finds_it_likelier():
    assert ask({"80 g/L [1]": -2.0, "70 g/L [1]": -4.0}, "70 g/L [1].")[0] == "80 g/L [1]."
    assert ask({"80 g/L [1]": -4.5, "70 g/L [1]": -4.0}, "70 g/L [1].")[0] is None
    assert ask({"12 mmol/L [1]": -1.0, "80 g/L [1]": -9.0}, "12 mmol/L [1].")[0] is None  # its own answer wins
    # a sentence-long answer keeps its place: a sum of log-probabilities favours the shorter text
    sentence = "The threshold for patients with acute coronary syndrome is 70 g/L [1]."
    assert ask({"80 g/L [1]": -2.0}, sentence)[0] is None
    # an answer its evidence does not back is replaced by the best span whatever it scores
    assert ask({"80 g/L [1]": -9.0}, "12 mmol/L [1].", unsupported=True)[0] == "80 g/L [1]."


@pytest.mark.parametrize("question, answer", [("Why is the threshold higher in coronary syndrome?", "80 g/L [1]."),
                                              ("What is the threshold?", "I don't know: the documents I have do not cover this question.")])
def test_explanations_and_abstentions_are_left_alone_without_running_the_model(question, answer):
    chosen, model = ask({"80 g/L [1]": 0.0}, answer, question)
    assert chosen is None and model.calls == 0


def test_torch_prefill_scores_paths_as_a_full_forward_pass(tiny_model_dir):
    import torch

    from vertical.generation import TorchPrefilled
    from vertical.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    prompt = [5, 9, 13, 2, 7]
    paths = [[4], [4, 8, 15], [16, 23], [4, 8, 15, 16, 23, 42, 7, 3, 1, 2, 9, 11, 12, 14]]
    prefilled = TorchPrefilled(model, prompt)
    scored = prefilled.follow(paths)
    again = prefilled.follow(paths[::-1])[::-1]  # a second call: the prompt's cache is intact
    assert [value for row in again for value in row] == pytest.approx([value for row in scored for value in row],
                                                                       abs=1e-5)
    for path, row in zip(paths, scored):
        with torch.inference_mode():
            full = model(torch.tensor([prompt + path])).logits[0].float().log_softmax(-1)
        expected = [float(full[len(prompt) - 1 + j, token]) for j, token in enumerate(path)]
        assert row == pytest.approx(expected, abs=1e-4)


class FakeGenerator:
    """onnxruntime-genai's Generator as OnnxPrefilled uses it, over a made-up model whose next-token
    logits depend on the whole sequence; `every_position=False` is a graph that keeps the last
    position's logits only (the builder's prune_lm_head)."""

    def __init__(self, every_position: bool, vocabulary: int = 50):
        self.every_position, self.vocabulary, self.sequence, self.appends = every_position, vocabulary, [], 0

    def logits_after(self, sequence: list[int]) -> np.ndarray:
        return np.random.default_rng(abs(hash(tuple(sequence))) % 2**32).normal(size=self.vocabulary)

    def append_tokens(self, tokens: list[int]) -> None:
        self.appends += 1
        start = len(self.sequence)
        self.sequence += tokens
        positions = range(start + 1, len(self.sequence) + 1) if self.every_position else [len(self.sequence)]
        self.output = np.stack([self.logits_after(self.sequence[:end]) for end in positions])[None]

    def get_output(self, name: str) -> np.ndarray:
        assert name == "logits"
        return self.output

    def get_logits(self) -> np.ndarray:
        return self.output[:, -1:]

    def rewind_to(self, length: int) -> None:
        del self.sequence[length:]

    def get_sequence(self, row: int) -> np.ndarray:
        return np.array(self.sequence)


@pytest.mark.parametrize("every_position", [True, False])
def test_the_bundles_reading_scores_every_token_of_each_path(every_position):
    from vertical.export.runtime import OnnxPrefilled
    from vertical.reader import log_softmax

    prompt = [5, 9, 13, 2, 7]
    paths = [[4, 8, 15], [4], [16, 23], [4, 8, 15, 16, 23, 42, 7, 3], [4, 8, 30]]
    generator = FakeGenerator(every_position)
    generator.append_tokens(prompt)
    reading = OnnxPrefilled(generator, len(prompt))
    scored = reading.follow(paths)
    appends = generator.appends
    for path, row in zip(paths, scored):
        expected = [float(log_softmax(generator.logits_after(prompt + path[:j]))[token]) for j, token in enumerate(path)]
        assert row == pytest.approx(expected, abs=1e-9)
    # the shared "4 8" is read once; a path's new tokens take one step where the graph gives every
    # position's logits (the prompt, then "4 8", "15 16 23 42 7", "16"), else one step a token
    # (after the one that finds out)
    assert appends == (4 if every_position else 1 + 1 + 2 + 5 + 1)
    assert reading.follow(paths[::-1])[::-1] == scored  # a second call starts from the prompt again


def test_the_span_among_the_questions_own_words_wins_when_the_model_cannot_tell():
    evidence = [source(3, "Most adults are given blood when haemoglobin falls below 70 g/L.",
                       "Patients with acute coronary syndrome have a threshold of 80 g/L.")]
    model = ScoredPrefill({"70 g/L [3]": -4.0, "80 g/L [3]": -4.0})
    question = "What threshold applies with acute coronary syndrome?"
    assert reconsider(lambda: model, model.tokenize, question, evidence, "70 g/L [3].", False) == "80 g/L [3]."
    # the words around a span weigh a few nats: a span the model finds far less likely stays out
    model = ScoredPrefill({"70 g/L [3]": -4.0, "80 g/L [3]": -12.0})
    assert reconsider(lambda: model, model.tokenize, question, evidence, "70 g/L [3].", False) is None
    # a question none of whose words is near either span leaves the model's answer
    model = ScoredPrefill({"70 g/L [3]": -4.0, "80 g/L [3]": -4.0})
    assert reconsider(lambda: model, model.tokenize, "What is the number?", evidence, "70 g/L [3].", False) is None


def test_a_span_must_beat_the_models_answer_by_a_margin():
    from vertical.reader import MARGIN

    assert ask({"80 g/L [1]": -4.0 + MARGIN / 2, "70 g/L [1]": -4.0}, "70 g/L [1].")[0] is None
    assert ask({"80 g/L [1]": -4.0 + MARGIN * 2, "70 g/L [1]": -4.0}, "70 g/L [1].")[0] == "80 g/L [1]."


@pytest.mark.parametrize("span, expected", [("15 percent", "percent"), ("1.5% of NAV", "percent"), ("GBP 180", "money"),
                                            ("80 pence", "money"), ("twelve years old", "age"), ("90 days", "duration"),
                                            ("fifteen years", "duration"), ("10 business days", "duration"),
                                            ("2016", "year"), ("12 September 2016", "year"), ("289 DR", "year"),
                                            ("1989-90", "year"), ("300 mg per day", "number"), ("1500 mg", "number"),
                                            ("extension 6712", "number"), ("Old Brannoc", "text"), ("thirty", "text")])
def test_the_kind_of_value_a_span_states(span, expected):
    from vertical.reader import kind

    assert kind(span) == expected


def test_a_question_rules_out_only_the_kinds_that_contradict_it():
    from vertical.reader import AGE, DURATION, MONEY, NUMBER, PERCENT, TEXT, YEAR, ruled_out

    assert YEAR in ruled_out("How old was Orrin when he started mining?")
    assert YEAR in ruled_out("What was Ilse's tenure as leader?") and DURATION not in ruled_out("How long is the tenure?")
    assert DURATION in ruled_out("How much salbutamol goes into the nebuliser?")
    assert DURATION in ruled_out("What daily dose of aspirin is started?") and NUMBER not in ruled_out("What dose?")
    # the first wording that matches decides: a length of time answers "how long ... to pay"
    assert DURATION not in ruled_out("How long does the supplier have to pay an invoice?")
    assert {PERCENT, MONEY, AGE, DURATION, YEAR} <= ruled_out("Who signs off the flight?")
    assert not {NUMBER, TEXT} & ruled_out("Who signs off the flight?")
    assert ruled_out("What is the yearly management fee?") == set()  # a fee may be a percentage


def test_an_answer_of_a_ruled_out_kind_or_that_repeats_the_question_gives_way_to_a_span():
    evidence = [source(4, "Orrin Vell went down the Deepvein in 289 DR, twelve years old.",
                       "Old Brannoc is Jory Thornwick's godfather.")]
    model = ScoredPrefill({"289 DR [4]": -1.0, "twelve years old [4]": -6.0, "Jory Thornwick [4]": -1.0,
                           "Old Brannoc [4]": -6.0})
    chosen = reconsider(lambda: model, model.tokenize, "How old was Orrin Vell when he started mining?", evidence,
                        "289 DR [4].", False)
    assert chosen == "twelve years old [4]."
    chosen = reconsider(lambda: model, model.tokenize, "Who is Jory Thornwick's godfather?", evidence,
                        "Jory Thornwick [4].", False)
    assert chosen == "Old Brannoc [4]."
    # an answer whose second sentence holds more than the question's words is weighed as usual
    chosen = reconsider(lambda: model, model.tokenize, "Who is Jory Thornwick's godfather?", evidence,
                        "Jory Thornwick [4]. His godfather is Old Brannoc.", False)
    assert chosen is None
    # of an allowed kind and likelier, the model's own answer stays
    chosen = reconsider(lambda: model, model.tokenize, "In what year did Orrin start mining?", evidence, "289 DR [4].", False)
    assert chosen is None
