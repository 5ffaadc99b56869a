"""Eval stage and `vertical eval`: scoring rules, every model of a build, external files, bundles."""

from __future__ import annotations

import json
import math

import pytest

from vertical.evaluate import edit_scores
from vertical.scoring import sample_items
from vertical.scoring import choose, is_correct, score_qa
from vertical.pack.schema import EditRequest, QAItem


class ScriptedLM:
    """A stand-in model: fixed log-probabilities per continuation text, fixed generated answers."""

    def __init__(self, prefer: dict[str, float], answer: str = ""):
        self.prefer, self.answer = prefer, answer
        self.ids: dict[str, int] = {}

    def chat_ids(self, messages, suffix=""):
        return [0]

    def piece_ids(self, text):
        # one id per distinct text (hash() % 1000 let two texts collide in some processes), two tokens: the multi-token path
        return [self.ids.setdefault(text, 1000 + len(self.ids)), 1]

    def logprobs(self, ids, continuation):
        for text, value in self.prefer.items():
            if self.piece_ids(" " + text) == continuation or self.piece_ids(" " + text.strip()) == continuation:
                return [value / 2, value / 2]
        return [-5.0, -5.0]

    def continuation_scores(self, ids, continuations):
        return [sum(self.logprobs(ids, continuation)) for continuation in continuations]

    def mean_logprobs(self, rows):
        return [sum(self.logprobs(ids, continuation)) / len(continuation) for ids, continuation in rows]

    def generate_batch(self, conversations, max_new_tokens, numbers=None):
        return [self.answer for _ in conversations]


def test_choice_is_the_most_probable_and_short_answers_match_whole_words():
    assert choose(ScriptedLM({"no": -0.1, "yes": -3.0}), [], ["yes", "no", "maybe"]) == "no"
    assert is_correct("The limit is 90 days, see [1].", "90 days")
    assert not is_correct("The limit is 190 days.", "90 days") and not is_correct("It is not known.", "no")
    # a citation is not an answer: "[2]" must not count for the gold answer "2"
    assert not is_correct("The cap is set in [2] and [1, 3].", "2") and is_correct("It takes 2 days [1].", "2")
    assert is_correct("It costs £60.", "60") and is_correct("about 86 days", "86.0") and not is_correct("1.5", "1.05")
    assert is_correct("It takes 2 working days.", "two working days") and is_correct("within one hour", "1 hour")
    assert not is_correct("someone called", "1") and not is_correct("twelve", "2")
    items = [QAItem(question="Is it?", choices=["yes", "no"], label="yes"), QAItem(question="Limit?", answer="90 days")]
    right = score_qa(ScriptedLM({"yes": -0.1}, "It is 90 days [1]."), items, "sys")
    wrong = score_qa(ScriptedLM({"no": -0.1}, "It is 60 days."), items, "sys")
    assert right["accuracy"] == 1.0 and wrong["accuracy"] == 0.0
    assert right["by_kind"] == {"choice": {"accuracy": 1.0, "n": 1}, "short": {"accuracy": 1.0, "n": 1}}
    # more than 40 words is wrong even when the gold answer is among them: quoting passages cannot pass
    assert not is_correct("The limit is 90 days. " + "word " * 40, "90 days")


def test_known_answers_are_reused_only_for_the_same_prompt_and_answer_length():
    items = [QAItem(question="Is it?", choices=["yes", "no"], label="yes"), QAItem(question="Limit?", answer="90 days")]
    first = score_qa(ScriptedLM({"yes": -0.1}, "It is 90 days."), items, "sys", max_new_tokens=32)
    known = {row["key"]: row for row in first["items"]}
    other = ScriptedLM({"no": -0.1}, "It is 60 days.")  # would get both wrong
    again = score_qa(other, items, "sys", max_new_tokens=32, known=known)
    assert again["reused"] == 2 and again["items"] == first["items"] and again["accuracy"] == 1.0
    for changed in ({"max_new_tokens": 16}, {"system_prompt": "other"}):
        args = {"system_prompt": "sys", "max_new_tokens": 32, **changed}
        fresh = score_qa(other, items, args["system_prompt"], max_new_tokens=args["max_new_tokens"], known=known)
        assert fresh["reused"] == 0 and fresh["accuracy"] == 0.0


def test_short_answers_are_batched_by_prompt_length_and_land_on_their_own_items():
    class EchoLM(ScriptedLM):
        batches: list[list[int]] = []

        def generate_batch(self, conversations, max_new_tokens, numbers=None):
            self.batches.append([len(c[-1]["content"]) for c in conversations])
            return [c[-1]["content"].split()[-1] for c in conversations]  # the question's last word

    lengths = [30, 3, 17, 9, 25, 1, 12, 40, 6, 21]  # out of order, more than one batch of 8
    items = [QAItem(question="x " * n + f"w{n}", answer=f"w{n}") for n in lengths]
    items.append(QAItem(question="Is it?", choices=["yes", "no"], label="yes"))
    lm = EchoLM({"yes": -0.1})
    result = score_qa(lm, items, "sys")
    assert result["accuracy"] == 1.0  # every answer came back to the item that asked it
    assert [r["prediction"] for r in result["items"][:-1]] == [f"w{n}" for n in lengths]
    flat = [n for batch in lm.batches for n in batch]
    assert flat == sorted(flat) and [len(b) for b in lm.batches] == [8, 2]


def test_an_answer_given_one_at_a_time_is_read_again_before_the_next_is_generated():
    """The bundle's model answers one question at a time and reads each answer's evidence right
    after it, so the second reading can start from the answer's own generator (the runtime's
    OnnxChatModel.prefill); the spans it prefers replace the answers as before."""
    import numpy as np

    from vertical.evidence import Sentence
    from vertical.prompting import Source

    text = "The standard apixaban dose is 5 mg twice daily."
    evidence = [Source(1, "Apixaban", "apixaban.md", 0, len(text), text, doc_id="apixaban",
                       sentences=(Sentence(0, len(text), text),))]
    calls: list[str] = []

    class OneAtATime(ScriptedLM):
        generation_batch = 1

        def generate_batch(self, conversations, max_new_tokens, numbers=None):
            calls.append("answer")
            return ["133 mg [1]." for _ in conversations]

        def prefill(self, ids):
            calls.append("read")
            lm = self

            class Read:
                first = np.zeros(5000)

                def follow(self, paths):  # the evidence's "5 mg" is the likeliest span
                    return [[0.0] if path[0] == lm.piece_ids("5 mg [1]")[0] else [-9.0] for path in paths]
            return Read()

    questions = ["What is the standard apixaban dose?", "What apixaban dose is standard?"]
    items = [QAItem(question=q, answer="5 mg", doc_id="apixaban") for q in questions]
    result = score_qa(OneAtATime({}), items, "sys", retriever=lambda question: evidence)
    assert calls == ["answer", "read", "answer", "read"]
    assert result["accuracy"] == 1.0 and all(row["reread"] and row["raw"] == "133 mg [1]." for row in result["items"])


def test_edit_scores_follow_the_counterfact_definitions():
    request = EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Bram Kett",
                          target_true="Ada Morrow", rephrase=["Quentar's mayor is"],
                          locality=[{"prompt": "The Siln flows into", "target": "Lake Vor"}])
    edited = ScriptedLM({"Bram Kett": -0.5, "Ada Morrow": -4.0, "Lake Vor": -0.2})
    assert edit_scores(edited, [request], ["Ada Morrow"]) == {"efficacy": 1.0, "generalization": 1.0,
                                                              "locality": 1.0, "n": 1}
    unedited = ScriptedLM({"Ada Morrow": -0.5, "Bram Kett": -4.0, "Lake Vor": -6.0})
    assert edit_scores(unedited, [request], ["Ada Morrow"])["efficacy"] == 0.0


def test_sample_is_at_least_half_short_answers_and_is_seeded():
    items = [QAItem(question=f"c{i}", choices=["a", "b"], label="a") for i in range(80)]
    items += [QAItem(question=f"s{i}", answer="x") for i in range(20)]
    sample = sample_items(items, 10, 0)
    # 20 of 100 are short answers, yet they make half the sample: the documents' own knowledge
    assert len(sample) == 10 and sum(1 for i in sample if not i.choices) == 5
    assert sum(1 for i in sample_items(items[:82], 10, 0) if not i.choices) == 2  # all there are
    assert [i.question for i in sample] == [i.question for i in sample_items(items, 10, 0)]
    assert sample_items(items, 0, 0) == items


def test_the_report_says_where_the_students_training_stopped():
    from vertical.evaluate.report import markdown

    row = {"model": "student + retrieval", "accuracy": 0.1, "choice": {"accuracy": None, "n": 0},
           "short": {"accuracy": 0.1, "n": 10}}
    report = {"pack": "p", "qa": [row], "questions": 10, "edits": [], "method": {}}
    assert "training stopped" not in markdown(report)
    report["student_stopped_early"] = "at step 20: retention 0.10 halfway, below half of the 0.9 the export needs"
    assert "The student's training stopped at step 20: retention 0.10 halfway" in markdown(report)


def test_eval_of_a_build_scores_every_model_and_writes_the_report(exported_build, tmp_path, cli):
    code, output = cli("eval", exported_build, "--out", tmp_path / "report")
    assert code == 0, output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    models = [row["model"] for row in report["qa"]]
    assert models == ["base alone", "base + retrieval", "edited + retrieval", "student + retrieval", "bundle (ONNX)"]
    for row in report["qa"]:
        assert row["n"] == report["questions"] > 0 and 0 <= row["accuracy"] <= 1
        assert row["accuracy"] == pytest.approx(sum(i["correct"] for i in row["items"]) / row["n"])
    assert [row["model"] for row in report["edits"]] == ["base", "edited", "student", "bundle (ONNX)"]
    # the edit stage's own measurement and this one agree on the edited model
    stage = json.loads((exported_build / "edit" / "metrics.json").read_text())
    assert report["edits"][1]["efficacy"] == stage["efficacy"]
    assert report["retrieval"]["recall@5"] == 1.0
    # the edits asked with retrieval, on the models that answer from the build's sources
    assert [row["model"] for row in report["edit_answers"]] == ["edited + retrieval", "bundle (ONNX)"]
    for row in report["edit_answers"]:
        assert row["n"] == report["edit_requests"] and [i["gold"] for i in row["items"]] == ["Bram Kett"]
    text = (tmp_path / "report" / "report.md").read_text()
    assert "How each number is computed" in text and "| base alone |" in text
    assert "| edited + retrieval |" in text.split("edits answered with the new value")[1]
    assert (tmp_path / "report" / "qa.png").stat().st_size > 1000 and (tmp_path / "report" / "edits.png").is_file()


def test_eval_reuses_the_distill_stages_answers_and_they_equal_fresh_ones(exported_build, tmp_path, cli, monkeypatch):
    code, output = cli("eval", exported_build, "--out", tmp_path / "reused")
    assert code == 0, output
    reused = {row["model"]: row for row in json.loads((tmp_path / "reused" / "report.json").read_text())["qa"]}
    # distill scored the teacher (edit/model) and the student on these questions; base was never scored
    assert reused["edited + retrieval"]["reused_from_earlier_stages"] == reused["edited + retrieval"]["n"] > 0
    assert reused["student + retrieval"]["reused_from_earlier_stages"] == reused["student + retrieval"]["n"]
    assert reused["base + retrieval"]["reused_from_earlier_stages"] == 0
    monkeypatch.setattr("vertical.scoring.known_predictions", lambda build_dir, model_dir: {})
    code, output = cli("eval", exported_build, "--out", tmp_path / "fresh")
    assert code == 0, output
    fresh = {row["model"]: row for row in json.loads((tmp_path / "fresh" / "report.json").read_text())["qa"]}
    assert fresh["student + retrieval"]["reused_from_earlier_stages"] == 0
    for name in reused:
        assert fresh[name]["items"] == reused[name]["items"], name


def test_eval_of_a_bundle_with_external_files(exported_build, tmp_path, cli):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "What colour is the Zorblat fruit?", "answer": "purple"}) + "\n"
                  + json.dumps({"question": "Is the Zorblat fruit purple?", "choices": ["yes", "no"], "label": "yes"})
                  + "\n")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "The Zorblat fruit is", "subject": "Zorblat", "target_new": "blue",
                                 "target_true": "purple"}) + "\n")
    code, output = cli("eval", exported_build / "export", "--qa", qa, "--edits", edits, "--out", tmp_path / "r")
    assert code == 0, output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [row["model"] for row in report["qa"]] == ["bundle (ONNX)"] and report["qa"][0]["n"] == 2
    assert report["edits"][0]["n"] == 1 and not math.isnan(report["edits"][0]["efficacy"])
    # what the bundle's manifest kept of its build: retrieval recall of both indexes, the bundle's speed
    assert "recall@1" in report["retrieval"] and "retrieval_bundle" not in report
    assert report["speed"]["bundle_tokens_per_s (ONNX)"] > 0
    code, output = cli("eval", exported_build / "export", "--out", tmp_path / "r2")
    assert code != 0 and "give --qa FILE" in output and not (tmp_path / "r2").exists()
    qa.write_text('{"question": "no answer"}\n')
    code, output = cli("eval", exported_build / "export", "--qa", qa, "--out", tmp_path / "r3")
    assert code != 0 and "qa.jsonl:1" in output and not (tmp_path / "r3").exists()
