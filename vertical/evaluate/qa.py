"""QA accuracy of a torch model on a pack's evaluation items.

Multiple-choice items (PubMedQA's yes/no/maybe) are scored by the model's probability of each
choice right after "Answer:", in the same prompt for every model, so base and tuned models are
compared on equal terms. Short-answer items are generated greedily and count as correct when the
normalised gold answer occurs in the normalised output.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

from vertical.pack.schema import QAItem
from vertical.prompting import Source, build_messages

Retriever = Callable[[str], list[Source]]
ANSWER_PREFIX = "Answer:"


def normalize(text: str) -> str:
    text = text.lower().replace("\u2009", " ")
    text = "".join(ch for ch in text if ch not in set(string.punctuation) - {".", "%"})
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)  # keep decimal points
    return " ".join(text.split())


def is_correct(prediction: str, gold: str) -> bool:
    """The normalised gold answer occurs in the prediction as whole words ("no" is not in "not")."""
    gold_n = normalize(gold)
    return bool(gold_n) and f" {gold_n} " in f" {normalize(prediction)} "


def _prompt_ids(tokenizer, messages: list[dict[str, str]], prefix: str) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def choose(model, tokenizer, messages: list[dict[str, str]], choices: list[str]) -> str:
    """The choice with the highest probability as the continuation of "Answer:"."""
    import torch

    prompt = _prompt_ids(tokenizer, messages, ANSWER_PREFIX)
    continuations = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in choices]
    with torch.inference_mode():
        if len({c[0] for c in continuations}) == len(continuations):  # one forward pass suffices
            logits = model(torch.tensor([prompt])).logits[0, -1]
            scores = [float(logits[c[0]]) for c in continuations]
        else:
            scores = []
            for cont in continuations:
                ids = torch.tensor([prompt + cont])
                logprobs = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
                scores.append(float(sum(logprobs[i, t] for i, t in enumerate(cont))))
    return choices[max(range(len(choices)), key=scores.__getitem__)]


def generate(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 48) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate_qa(model, tokenizer, items: list[QAItem], system_prompt: str, retriever: Retriever | None = None,
                track=None) -> dict:
    """Accuracy over `items`; with a retriever every question gets its retrieved sources."""
    correct, rows = 0, []
    iterator = track(items, len(items), "QA evaluation") if track else items
    for item in iterator:
        sources = retriever(item.question) if retriever else None
        messages = build_messages(system_prompt, item.question, sources)
        if item.choices:
            prediction = choose(model, tokenizer, messages, item.choices)
            ok = prediction == item.gold
        else:
            prediction = generate(model, tokenizer, messages)
            ok = is_correct(prediction, item.gold)
        correct += ok
        rows.append({"question": item.question, "gold": item.gold, "prediction": prediction.strip()[:200], "correct": ok})
    return {"accuracy": round(correct / len(items), 4) if items else None, "n": len(items), "items": rows}


def mean_loss(model, features: list[dict], batch_size: int = 4) -> float:
    """Mean next-token loss over the labelled (assistant) tokens of tokenised examples."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            width = max(len(f["input_ids"]) for f in batch)
            pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
            ids = torch.tensor([pad(f["input_ids"], 0) for f in batch])
            mask = torch.tensor([pad(f["attention_mask"], 0) for f in batch])
            labels = torch.tensor([pad(f["labels"], -100) for f in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                                                       ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((target != -100).sum())
    return total / max(count, 1)
