"""A model cut to its pack's vocabulary: the same tokens for the pack's texts, any text still encodes."""

from __future__ import annotations

import json

import pytest

PACK_TEXTS = ["The Zorblat fruit is bright purple and grows on the northern islands.",
              "Notice must be given 90 days before the end of the term [1].",
              "I don't know."]


@pytest.fixture(scope="module")
def trimmed(tiny_model_dir, tmp_path_factory):
    from vertical.models.vocabulary import trim_vocabulary

    out = tmp_path_factory.mktemp("trimmed") / "model"
    return trim_vocabulary(tiny_model_dir, PACK_TEXTS, out, core_merges=20), out


def test_the_pack_texts_keep_their_tokens_and_other_text_still_encodes(tiny_model_dir, trimmed):
    from tokenizers import Tokenizer

    vocabulary, out = trimmed
    full = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    small = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert vocabulary.size < vocabulary.full_size == full.get_vocab_size()
    assert small.get_vocab_size() == vocabulary.size
    for text in PACK_TEXTS:
        assert [vocabulary.kept[i] for i in small.encode(text).ids] == full.encode(text).ids
    unseen = "Quixotic wizards juggle 7 xylophones; ünïcödé ✓"
    ids = small.encode(unseen).ids
    assert small.decode(ids) == unseen
    assert len(ids) > len(full.encode(unseen).ids)  # smaller pieces, not lost characters
    recorded = json.loads((out / "vocabulary.json").read_text())
    assert recorded["kept"] == vocabulary.kept and recorded["full_size"] == vocabulary.full_size


def test_the_trimmed_model_scores_kept_tokens_as_the_whole_model_does(tiny_model_dir, trimmed):
    import torch

    from vertical.models import load_causal_lm, load_tokenizer

    vocabulary, out = trimmed
    full_model, small_model = load_causal_lm(tiny_model_dir), load_causal_lm(out)
    full_tokenizer, small_tokenizer = load_tokenizer(tiny_model_dir), load_tokenizer(out)
    assert small_model.config.vocab_size == vocabulary.size
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        old, new = getattr(full_model.config, key), getattr(small_model.config, key)
        assert vocabulary.kept[new] == old
        assert small_tokenizer.convert_ids_to_tokens(new) == full_tokenizer.convert_ids_to_tokens(old)
    ids = full_tokenizer(PACK_TEXTS[0])["input_ids"]
    new_ids = small_tokenizer(PACK_TEXTS[0])["input_ids"]
    assert [vocabulary.kept[i] for i in new_ids] == ids
    with torch.no_grad():
        full_logits = full_model(torch.tensor([ids])).logits[0]
        small_logits = small_model(torch.tensor([new_ids])).logits[0]
    assert torch.allclose(full_logits[:, vocabulary.kept], small_logits, atol=1e-5)
    assert small_model.get_output_embeddings().weight.data_ptr() == small_model.get_input_embeddings().weight.data_ptr()


def test_every_kept_token_can_be_made_from_kept_parts(tiny_model_dir):
    from vertical.models.vocabulary import kept_tokens, trimmed_tokenizer_json

    tokenizer = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    longest = max(vocab, key=len)  # a token several merges deep
    kept = kept_tokens(tokenizer, [vocab[longest]], core_merges=0)
    small = trimmed_tokenizer_json(tokenizer, kept)
    made = {m if isinstance(m, str) else " ".join(m) for m in small["model"]["merges"]}
    assert longest in small["model"]["vocab"]
    for token in small["model"]["vocab"]:
        # a kept token is a byte, a special token, or the result of a kept merge of kept tokens
        if len(token) > 1 and token not in {a["content"] for a in small["added_tokens"]}:
            assert any(m.replace(" ", "", 1) == token for m in made), token
    assert all(a["id"] < len(kept) for a in small["added_tokens"])


def test_the_pack_texts_hold_the_prompt_scaffolding_and_each_word_as_an_answer_starts_it(tiny_pack, tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from vertical.export import pack_texts
    from vertical.pack import load_pack
    from vertical.prompting import ANSWER_RULE, SOURCES_RULE, Source, build_messages

    pack = load_pack(tiny_pack)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model").symlink_to(tiny_model_dir)
    chunk = SimpleNamespace(title="Fruit of the islands", source="documents/fruit.md", start=0, end=40,
                            text="The zorblat fruit is purple.")
    source = Source(1, chunk.title, chunk.source, chunk.start, chunk.end, chunk.text)
    prompt = build_messages(pack.config.system_prompt, "What colour is it?", [source])
    texts = list(pack_texts(pack, tmp_path, SimpleNamespace(chunks=[chunk]), [prompt]))
    joined = "\n".join(texts)
    assert "[1] Fruit of the islands (documents/fruit.md)" in joined  # a source as the model is shown it
    assert "Zorblat\nFruit\nIs\nPurple." in joined  # each word as an answer would start with it
    assert "The Zorblat Fruit Is Purple." in joined  # and as a question starts after "Question:"
    assert "<|im_start|>" in joined and "What colour is it?" in joined  # the chat template's own text
    assert SOURCES_RULE in joined and ANSWER_RULE in joined  # the answer path's scaffolding
    assert pack.config.disclaimer in joined and pack.instructions()[0][-1].content in joined
    assert not any(item.question in joined for item in pack.qa_eval())  # evaluation items stay held out


def test_a_templates_special_token_ids_follow_the_renumbering():
    from vertical.models.vocabulary import trimmed_tokenizer_json

    tokenizer = {"added_tokens": [{"id": 5, "content": "<s>"}],
                 "post_processor": {"type": "TemplateProcessing", "special_tokens": {"<s>": {"id": "<s>", "ids": [5]}}},
                 "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "c": 3, "<s>": 5}, "merges": ["a b"]}}
    small = trimmed_tokenizer_json(tokenizer, [0, 1, 2, 5])
    assert small["post_processor"]["special_tokens"]["<s>"]["ids"] == [3]
    assert small["added_tokens"][0]["id"] == 3 and small["model"]["vocab"] == {"a": 0, "b": 1, "ab": 2, "<s>": 3}
    assert tokenizer["post_processor"]["special_tokens"]["<s>"]["ids"] == [5]  # the whole tokenizer is left as it was


def test_only_a_bpe_vocabulary_is_cut(tmp_path):
    from vertical.errors import VerticalError
    from vertical.models.vocabulary import kept_tokens, trim_vocabulary

    with pytest.raises(VerticalError, match="WordPiece"):
        kept_tokens({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, [0])
    with pytest.raises(VerticalError, match="no tokenizer.json"):
        trim_vocabulary(tmp_path, ["text"], tmp_path / "out")
