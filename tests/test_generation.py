"""The one batched generation and decode-speed measurement that every stage uses."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model
from vertical.evidence import LoopGuard
from vertical.generation import (SPEED_PROMPT, chat_prompt_ids, decode_speeds, generate_batch, greedy_ids,
                                 greedy_rows, stop_when_answered, time_decoding)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vertical.models import load_causal_lm, load_tokenizer

    folder = make_tiny_model(tmp_path_factory.mktemp("gen") / "model")
    return load_causal_lm(folder), load_tokenizer(folder)


def test_a_batch_gives_each_prompt_its_own_greedy_answer(tiny):
    model, tokenizer = tiny
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}])
               for q in ["What is the dose?", "Which clause applies to a late payment by the tenant?"]]
    together = generate_batch(model, prompts, tokenizer.pad_token_id, 6)
    alone = [generate_batch(model, [p], tokenizer.pad_token_id, 6)[0] for p in prompts]
    assert [row[:len(a)] for row, a in zip(together, alone)] == alone


@pytest.mark.parametrize("answer", ["Twelve [1]. It is twelve. More", "Twelve [1]. It is",
                                    "take the dose, take the dose, take the dose"])
def test_a_batch_row_ends_where_the_assistant_stops_streaming_its_answer(tiny, answer):
    import torch

    _, tokenizer = tiny
    prompt = [tokenizer.pad_token_id] * 3
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    criterion = stop_when_answered(tokenizer, len(prompt))
    guard = LoopGuard()
    for end in range(1, len(ids) + 1):  # token by token, as generation and the stream see it
        stopped = guard.feed(tokenizer.decode(ids[end - 1:end]))
        assert bool(criterion(torch.tensor([prompt + ids[:end]]), None)[0]) == stopped
    assert guard.stopped == (answer != "Twelve [1]. It is")


def test_the_speed_loop_writes_the_greedy_tokens(tiny):
    model, tokenizer = tiny
    prompt = chat_prompt_ids(tokenizer, SPEED_PROMPT)
    assert list(greedy_ids(model, prompt, 8)) == generate_batch(model, [prompt], tokenizer.pad_token_id, 8,
                                                                 min_new_tokens=8)[0]


def test_greedy_rows_are_each_prompts_greedy_tokens_end_of_text_included(tiny):
    model, tokenizer = tiny
    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}])
               for q in ["What is the dose?", "Which clause applies to a late payment by the tenant?"]]
    assert len(set(map(len, prompts))) == 2  # the shorter prompt is padded
    assert greedy_rows(model, prompts, tokenizer.pad_token_id, 12) == [list(greedy_ids(model, p, 12)) for p in prompts]


def test_decode_speed_counts_the_tokens_after_the_first():
    import time

    def tokens(count: int, pause: float):
        for _ in range(count):
            time.sleep(pause)
            yield 0

    speed = time_decoding(tokens(5, 0.02))
    assert 4 / 0.08 * 0.5 < speed.tokens_per_s <= 4 / 0.08 * 1.01  # 4 tokens after the first in >= 80 ms
    assert speed.first_token_ms >= 20
    assert time_decoding(tokens(1, 0)) is None
    both = decode_speeds({"fast": lambda: tokens(4, 0.001), "slow": lambda: tokens(4, 0.02)}, runs=1)
    assert both["fast"].tokens_per_s > both["slow"].tokens_per_s


def test_a_stream_its_reader_stops_reading_stops_decoding(tmp_path):
    """An answer cut early (a loop, two sentences) must not leave a thread decoding: one still
    running when the interpreter exits aborts the process after the answer is printed."""
    import threading

    from vertical.generation import ChatModel

    model = ChatModel(make_tiny_model(tmp_path / "model"))
    before = set(threading.enumerate())  # other tests' threads may end meanwhile: only new ones count
    pieces = model.stream([{"role": "user", "content": "Tell me everything about the valley."}], max_new_tokens=4000)
    next(pieces)
    assert set(threading.enumerate()) - before  # the decoding thread runs while the reader reads
    pieces.close()
    assert not set(threading.enumerate()) - before
