"""Evidence selection, loop cutting and the faithfulness check (vertical.evidence), without models."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vertical.evidence import (EvidenceSelector, LoopGuard, NumberCopy, NumberVocabulary, allowed_numbers,
                               asks_for_number, check_answer, cut_answer, is_faithful, key_content, split_sentences)
from vertical.prompting import Source
from vertical.tune.generate import generate_questions, question_for


@dataclass
class FakeChunk:
    id: str
    doc_id: str
    title: str
    source: str
    start: int
    end: int
    text: str


DOC = ("# Sepsis\n\n## Treatment\nGive piperacillin-tazobactam within 1 hour. Dr. Lee audits it e.g. monthly.\n"
       "- The outreach team is on extension 4410.\n| drug | dose |\n|---|---|\n| paracetamol | 3 g |\n")


def test_sentences_keep_their_document_spans_and_skip_headings():
    sentences = split_sentences(DOC, offset=100)
    texts = [s.text for s in sentences]
    assert texts == ["Give piperacillin-tazobactam within 1 hour.", "Dr. Lee audits it e.g. monthly.",
                     "The outreach team is on extension 4410.", "| drug | dose |", "| paracetamol | 3 g |"]
    for s in sentences:
        assert DOC[s.start - 100:s.end - 100] == s.text


def bag_of_words_encoder(texts):
    """A stand-in embedder: normalised counts of a small vocabulary."""
    vocabulary = ["antibiotic", "piperacillin", "extension", "outreach", "dose", "paracetamol", "audit", "hour"]
    rows = []
    for text in texts:
        low = text.lower()
        row = np.array([low.count(word) for word in vocabulary], dtype=np.float32) + 1e-3
        rows.append(row / np.linalg.norm(row))
    return np.stack(rows)


def test_the_selector_keeps_the_sentences_that_answer_and_numbers_sources_by_chunk():
    chunks = [FakeChunk("a#0", "a", "Other", "a.md", 0, 40, "Hand hygiene matters. Wash for 20 seconds."),
              FakeChunk("s#0", "sepsis", "Sepsis", "s.md", 0, len(DOC), DOC)]
    sources = EvidenceSelector(bag_of_words_encoder, sentences=1).select(
        "Which extension reaches the outreach team?", chunks)
    assert len(sources) == 1 and sources[0].number == 1 and sources[0].doc_id == "sepsis"
    assert sources[0].text == "The outreach team is on extension 4410."
    assert [(s.start, s.end) for s in sources[0].sentences] == [(DOC.index("The outreach"),
                                                                 DOC.index("The outreach") + len(sources[0].text))]


def test_loops_are_cut_and_answers_keep_to_two_sentences():
    assert cut_answer("It is 3 g [1]. It is 3 g [1]. It is 3 g [1].") == ("It is 3 g [1].", True)
    assert cut_answer("the limit is 3 g a day and the limit is 3 g a day and")[0] == "the limit is 3 g a day and"
    assert cut_answer("One thing. Two things. Three things.") == ("One thing. Two things.", True)
    assert cut_answer("90 days [2]") == ("90 days [2]", False)
    guard = LoopGuard()
    stops = [guard.feed(p) for p in ["The dose", " is 3 g.", " The dose", " is 3 g."]]
    assert stops == [False, False, False, True] and guard.text == "The dose is 3 g."
    # a number's decimal point does not end the second sentence: the stream goes on to read "3.5"
    guard = LoopGuard()
    stops = [guard.feed(p) for p in ["3", ".", "5", " [1].", " Answer: 3", ".", "5", " [1].", " More"]]
    assert stops == [False] * 8 + [True] and guard.text == "3.5 [1]. Answer: 3.5 [1]."


def test_an_answer_stating_what_its_evidence_lacks_is_replaced_by_the_evidence():
    assert key_content("Doran Kest pays 20 silver [1].") == ({"20"}, {"kest"})
    evidence = "Adults under 50 kg take no more than 3 g in 24 hours."
    assert is_faithful("3 g in 24 hours [1]", evidence) and not is_faithful("4 g [1]", evidence)
    assert is_faithful("I don't know: the documents I have do not cover this question.", evidence)
    assert is_faithful("Check it at 4 hours [1].", "Take the level four hours after the overdose.")
    source = Source(number=2, title="Paracetamol", source="p.md", start=0, end=60, text=evidence,
                    sentences=tuple(split_sentences(evidence)))
    checked = check_answer("The limit is 4 g [2].", "What is the limit for adults under 50 kg?", [source])
    assert checked.fallback and not checked.faithful and checked.raw == "The limit is 4 g [2]."
    # the user is told, and pointed at the evidence, which is not quoted: a quote must not pass for an answer
    assert checked.text == "I could not find a clear answer in the sources; the closest evidence is in [2]."
    yes = check_answer("Answer: yes.", "Which limit applies to adults under 50 kg?", [source])
    assert yes.fallback and "3 g" not in yes.text
    assert check_answer("Answer: no.", "Is the limit 4 g?", [source]).text == "no."
    kept = check_answer("3 g [2]. 3 g [2].", "What is the limit?", [source])
    assert kept.text == "3 g [2]." and kept.faithful and not kept.fallback and kept.cut


def test_generated_questions_ask_for_a_span_of_their_sentence_and_skip_held_out_facts():
    assert question_for("The renewal notice period is 90 days.", 29, 36, "quantity") == \
        ("The renewal notice period is how many days?", "The renewal notice period is 90 days.")
    assert question_for("Doran Kest commands the Ashen Wardens in Emberfall.", 0, 10, "name")[0] == \
        "Who commands the Ashen Wardens in Emberfall?"
    text = "The warden of the pass is Doran Kest. A healing draught costs 20 silver in the town of Emberfall."
    chunk = FakeChunk("g#0", "games", "Games", "g.md", 0, len(text), text)
    found = generate_questions([chunk], 10, 0, held_out_facts=set(), held_out_questions=[])
    assert found and all(q.answer in q.sentence and text[q.span[0]:q.span[1]] == q.answer and q.answer in q.reply
                         for q in found)
    held = {("games", "doran kest"), ("games", "20 silver"), ("games", "emberfall")}
    assert generate_questions([chunk], 10, 0, held_out_facts=held, held_out_questions=[]) == []
    near = generate_questions([chunk], 10, 0, set(), ["Who is the warden of the pass?", "What does a draught cost?"])
    assert all("warden" not in q.question.lower() and "draught" not in q.question.lower() for q in near)


def test_a_small_pack_gets_a_question_from_every_sentence_that_holds_a_fact():
    text = ("The ferry to Skelda leaves at 07:40 on weekdays. A return ticket for a car costs £38 in winter. "
            "The harbour office closes at 17:00 on Saturdays. Form IC-3 is signed by Captain Niamh Ferrier each year. "
            "The linkspan at the quay carries vehicles of up to 44 tonnes.")
    chunk = FakeChunk("f#0", "ferry", "Ferry", "f.md", 0, len(text), text)
    found = generate_questions([chunk], 10, 0, held_out_facts=set(), held_out_questions=[])
    assert len(found) == 5 and len({q.sentence for q in found}) == 5  # not two: the chunk is visited again
    assert len(generate_questions([chunk], 3, 0, held_out_facts=set(), held_out_questions=[])) == 3


def test_how_much_questions_favour_sentences_that_state_a_number():
    assert asks_for_number("How long can step-in last?") and asks_for_number("What is the fee cap?")
    assert not asks_for_number("Who owns the travel policy?")
    chunks = [FakeChunk("d#0", "d", "Dose", "d.md", 0, 80, "The dose is set by weight. The dose is 4 g.")]
    sources = EvidenceSelector(bag_of_words_encoder, sentences=1).select("How much paracetamol is the dose?", chunks)
    assert sources[0].text == "The dose is 4 g."


DIGITS = [str(d) for d in range(10)]
PIECES = DIGITS + [",", ".", " days", " [", "].", "a", " "]


def allowed_pieces(rule: NumberCopy, text: str) -> list[str]:
    return [piece for piece, blocked in zip(PIECES, rule.blocked(text)) if not blocked]


def test_an_answer_writes_only_the_numbers_of_its_evidence():
    source = Source(1, "Fees", "f.md", 0, 60, "The fee is £1,250 and business hours end at 5.30 pm; notice is 60 days.")
    allowed = allowed_numbers("What happens after two days?", [source])
    assert allowed == {"1,250", "5.30", "60", "2"}
    rule = NumberCopy(allowed, NumberVocabulary(PIECES))
    assert set(allowed_pieces(rule, "The fee is ")) >= {"1", "5", "6", "2", " days"}
    assert "3" not in allowed_pieces(rule, "The fee is ")  # no number of the evidence starts with 3
    assert allowed_pieces(rule, "It is 6") == ["0"]  # "6" alone is not in the evidence: only "60" goes on
    assert allowed_pieces(rule, "It is 1") == [","] and allowed_pieces(rule, "It is 1,") == ["2"]
    after_60 = allowed_pieces(rule, "It is 60")
    assert "0" not in after_60 and {".", " days", "].", " "} <= set(after_60)  # "60" is whole: it may end
    assert allowed_pieces(rule, "60 days [") == PIECES  # a citation's number is free


def test_the_torch_logits_processor_holds_each_row_to_its_own_numbers(tiny_model_dir):
    import torch

    from vertical.generation import copy_numbers, number_vocabulary
    from vertical.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    vocabulary = number_vocabulary(tokenizer)
    digit = {tokenizer.decode([i]): i for i in vocabulary.digit_ids.tolist()}
    assert set(DIGITS) <= set(digit)
    processors = copy_numbers(tokenizer, [{"42"}, None], prompt_width=1)
    prompt = tokenizer("x", add_special_tokens=False)["input_ids"][:1]
    ids = torch.tensor([prompt + [digit["4"]], prompt + [digit["4"]]])
    scores = torch.zeros(2, len(tokenizer))
    scores[:, digit["7"]] = 5.0  # the model's favourite continuation: "47"
    scores[:, digit["2"]] = 1.0
    out = processors(ids, scores.clone())
    assert int(out[0].argmax()) == digit["2"]  # "47" is not in the evidence, "42" is
    assert int(out[1].argmax()) == digit["7"]  # no constraint on the second row


def test_a_number_the_question_gives_or_the_answer_works_out_from_known_numbers_is_faithful():
    question = "Over 4 years, earnings grow from 250 to 400. What is the CAGR, to one decimal place?"
    assert is_faithful("12.5%. CAGR = (400 / 250)^(1/4) - 1 = 12.5%.", "CAGR is the yearly growth rate.", question)
    assert is_faithful("From 250 to 400 [1].", "", question)  # restating the question's figures
    # the working is checked: a wrong result, an operand from nowhere, or a sum cut off derive nothing
    assert not is_faithful("13.5%. CAGR = (400 / 250)^(1/4) - 1 = 13.5%.", "", question)
    assert not is_faithful("12.5%. CAGR = (400 / 260)^(1/4) - 1 = 12.5%.", "", question)
    assert not is_faithful("12.5%. CAGR = (400 / 250)^(1/", "", question)
    assert is_faithful("Net 1,115.57 - 1,000 = 115.57 [1].", "PV 1,115.57 against 1,000 invested.", "What is the NPV?")
    assert not is_faithful("Tax 20 x 3 = 70 [1].", "A rate of 20 on 3 items.", "What tax?")
    assert not is_faithful("2 ** 2 ** 99 = 5.", "2 and 99", "What?")  # only small powers are evaluated
    checked = check_answer("12.5%. CAGR = (400 / 250)^(1/4) - 1 = 12.5%.", question, [])
    assert checked.faithful and not checked.fallback
    assert not is_faithful("1. Net margin = 182.0 / 305.0 = 1.", "Net income 182.0, revenue 305.0.", "Net margin?")
