"""Edit stage: ROME / MEMIT / FT mechanics on the tiny model, the log, bit-exact rollback, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vertical import pipeline
from vertical.errors import VerticalError


def _with_edit(pack: Path, **edit) -> None:
    config = yaml.safe_load((pack / "pack.yaml").read_text())
    config["stages"]["edit"] = edit
    (pack / "pack.yaml").write_text(yaml.safe_dump(config))


FAST = {"layer": 1, "layers": [0, 1], "context_templates": 2, "context_tokens": 4, "v_steps": 10, "mom2_tokens": 1000}


@pytest.fixture
def edited_build(tiny_pack, tmp_path, tiny_model_dir):
    _with_edit(tiny_pack, method="rome", hparams=FAST)
    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["index", "edit"], base_model=str(tiny_model_dir))
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def test_edit_stage_changes_only_the_logged_layer(edited_build):
    before, after = _weights(edited_build / "base" / "model"), _weights(edited_build / "edit" / "model")
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    entries = [json.loads(line) for line in (edited_build / "edit" / "log.jsonl").read_text().splitlines()]
    assert entries[0]["id"] == "edit-0001" and entries[0]["weights"] == changed and entries[0]["method"] == "rome"
    deltas = load_file(str(edited_build / "edit" / entries[0]["file"]))
    name = changed[0]
    assert torch.equal(deltas[f"before.{name}"], before[name])
    assert torch.equal(deltas[f"before.{name}"] + deltas[f"delta.{name}"], after[name])
    # ROME's update is rank one
    assert torch.linalg.matrix_rank(deltas[f"delta.{name}"].double(), rtol=1e-6) == 1
    metrics = json.loads((edited_build / "edit" / "metrics.json").read_text())
    for key in ("efficacy", "generalization", "locality", "fluency", "seconds_per_edit", "before", "after"):
        assert key in metrics


def test_cli_edit_then_rollback_is_bit_exact(edited_build, cli, tmp_path, tiny_model_dir):
    requests = tmp_path / "more.jsonl"
    requests.write_text(json.dumps({"prompt": "The Siln river flows into", "subject": "Siln", "target_new": "Lake Vor",
                                    "target_true": "the sea", "rephrase": ["The Siln flows into"]}) + "\n")
    original = _weights(edited_build / "edit" / "model")
    code, output = cli("edit", edited_build, "--requests", requests, "--method", "memit")
    assert code == 0, output
    assert "efficacy" in output
    log = (edited_build / "edit" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in log] == ["edit-0001", "edit-0002"]
    assert json.loads(log[1])["layers"] == [0, 1]
    assert not all(torch.equal(original[k], v) for k, v in _weights(edited_build / "edit" / "model").items())

    code, output = cli("edit", "rollback", edited_build)
    assert code == 0 and "edit-0002" in output
    restored = _weights(edited_build / "edit" / "model")
    assert all(torch.equal(original[k], restored[k]) for k in original)

    code, output = cli("edit", "rollback", edited_build, "edit-0001")
    assert code == 0
    base = _weights(edited_build / "base" / "model")
    assert all(torch.equal(base[k], v) for k, v in _weights(edited_build / "edit" / "model").items())
    code, output = cli("edit", "rollback", edited_build)
    assert code != 0 and "no applied edits" in output
    # the manifest knows the new files: the next build keeps the rolled-back state
    pack_dir = json.loads((edited_build / "manifest.json").read_text())["pack_dir"]
    assert pipeline.build(pack_dir, out=edited_build, steps=["edit"], base_model=str(tiny_model_dir))[-1].status == "skipped"
    # a new edit after rollbacks gets a new number: edit-0002 already named the undone one
    copy = Path(shutil.copytree(edited_build, tmp_path / "copy"))
    code, output = cli("edit", copy, "--requests", requests, "--method", "memit")
    assert code == 0, output
    assert [json.loads(line)["id"] for line in (copy / "edit" / "log.jsonl").read_text().splitlines()] == ["edit-0003"]


def test_edits_can_be_reapplied_to_a_copy(edited_build):
    from vertical.edit import apply_deltas, read_log
    from vertical.models import load_causal_lm

    copy = load_causal_lm(edited_build / "base" / "model")
    apply_deltas(copy, read_log(edited_build / "edit"), edited_build / "edit")
    edited = _weights(edited_build / "edit" / "model")
    params = dict(copy.named_parameters())
    assert torch.equal(params["model.layers.1.mlp.down_proj.weight"], edited["model.layers.1.mlp.down_proj.weight"])


def test_ft_baseline_respects_its_constraint(tiny_pack, tmp_path, tiny_model_dir):
    _with_edit(tiny_pack, method="ft", hparams={**FAST, "ft_norm_constraint": 1e-3})
    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["edit"], base_model=str(tiny_model_dir))
    name = "model.layers.1.mlp.down_proj.weight"
    change = _weights(out / "edit" / "model")[name] - _weights(out / "base" / "model")[name]
    assert 0 < change.abs().max() <= 1e-3 + 1e-7


@pytest.mark.parametrize("bad,expected", [
    ({"prompt": "The mayor is", "subject": "Quentar", "target_new": "X"}, "does not occur in prompt"),
    ({"prompt": "Quentar is", "subject": "Quentar", "target_new": ""}, "target_new"),
])
def test_bad_requests_are_refused(edited_build, cli, tmp_path, bad, expected):
    requests = tmp_path / "bad.jsonl"
    requests.write_text(json.dumps(bad) + "\n")
    before = (edited_build / "edit" / "log.jsonl").read_text()
    code, output = cli("edit", edited_build, "--requests", requests)
    assert code != 0 and expected in output and "Traceback" not in output
    assert (edited_build / "edit" / "log.jsonl").read_text() == before


def test_whitespace_target_and_bad_layer_leave_model_untouched(edited_build, cli, tmp_path):
    requests = tmp_path / "r.jsonl"
    requests.write_text(json.dumps({"prompt": "Quentar is", "subject": "Quentar", "target_new": "   "}) + "\n")
    before = _weights(edited_build / "edit" / "model")
    code, output = cli("edit", edited_build, "--requests", requests)
    assert code != 0 and "tokenizes to nothing" in output
    assert all(torch.equal(before[k], v) for k, v in _weights(edited_build / "edit" / "model").items())


def test_nan_during_optimisation_is_refused_and_nothing_changes(tiny_pack, tmp_path, tiny_model_dir):
    from vertical.models import load_causal_lm, load_tokenizer

    poisoned = tmp_path / "poisoned"
    model = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("nan")  # NaN appears mid-network
    model.save_pretrained(poisoned)
    load_tokenizer(tiny_model_dir).save_pretrained(poisoned)
    _with_edit(tiny_pack, method="rome", hparams={**FAST, "mom2": "identity", "context_templates": 0})
    out = tmp_path / "b"
    with pytest.raises(VerticalError, match="not finite"):
        pipeline.build(tiny_pack, out=out, steps=["edit"], base_model=str(poisoned))
    assert not (out / "edit").exists()


def test_unknown_model_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from vertical.edit.layout import ffn_layout

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(VerticalError, match="no known FFN layout"):
        ffn_layout(model)


def test_edit_layer_out_of_range(tiny_pack, tmp_path, tiny_model_dir):
    _with_edit(tiny_pack, method="rome", hparams={**FAST, "layer": 7})
    with pytest.raises(VerticalError, match="edit layer 7 does not exist"):
        pipeline.build(tiny_pack, out=tmp_path / "b", steps=["edit"], base_model=str(tiny_model_dir))


def test_edit_requests_file_must_exist(edited_build, cli, tmp_path):
    code, output = cli("edit", edited_build, "--requests", tmp_path / "none.jsonl")
    assert code != 0 and "does not exist" in output
    code, output = cli("edit", edited_build)
    assert code != 0 and "--requests FILE is required" in output


def test_trace_cli_writes_heatmap(edited_build, cli):
    code, output = cli("trace", edited_build, "--prompt", "The mayor of Quentar is", "--subject", "Quentar")
    assert code == 0, output
    png = edited_build / "trace" / "quentar-mlp.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, output = cli("trace", edited_build, "--prompt", "The mayor is", "--subject", "Quentar")
    assert code != 0 and "does not occur in prompt" in output
    code, output = cli("trace", edited_build, "--prompt", "Quentar is", "--subject", "Quentar", "--kind", "heads")
    assert code != 0 and "--kind heads" in output


def test_key_statistics_stop_the_forward_at_the_last_needed_layer(tiny_model_dir):
    from vertical.edit.compute import capture_keys
    from vertical.edit.layout import ffn_layout
    from vertical.edit.stats import second_moment
    from vertical.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    layout = ffn_layout(model)
    texts = ["the quick brown fox jumps over the lazy dog " * 20, "a second text about other things " * 20]
    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = ids[:300]
    expected = {}
    with torch.inference_mode(), capture_keys(layout, [0, 1]) as seen:  # a full forward, by hand
        sums = {0: 0, 1: 0}
        for start in range(0, len(ids), 128):
            model(input_ids=torch.tensor([ids[start:start + 128]]))
            for layer in (0, 1):
                sums[layer] = sums[layer] + seen[layer][0].double().T @ seen[layer][0].double()
        expected = {layer: (sums[layer] / len(ids)).float() for layer in (0, 1)}
    got = second_moment(model, tokenizer, layout, [0, 1], texts, 300, block=128)
    for layer in (0, 1):
        assert torch.allclose(got[layer], expected[layer], rtol=1e-5, atol=1e-7)
    probe = torch.tensor([ids[:10]])
    with torch.inference_mode():  # the early stop leaves no hook behind
        assert model(input_ids=probe).logits.shape[1] == 10


def test_batched_target_logprobs_equal_one_row_at_a_time(tiny_model_dir):
    from vertical.edit.metrics import target_logprobs
    from vertical.edit.tokens import encode, target_ids
    from vertical.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    pairs = [("The Zorblat fruit is", "blue"), ("A much longer prompt about the colour of fruit, which is", "deep red"),
             ("Paris is the capital of", "France"), ("x", "a b c d e f")]
    batched = target_logprobs(model, tokenizer, pairs)
    for (prompt, target), value in zip(pairs, batched):  # one unpadded forward per pair, by hand
        prompt_ids, ids = encode(tokenizer, prompt), target_ids(tokenizer, target)
        with torch.inference_mode():
            logp = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1:-1].float().log_softmax(-1)
        expected = float(logp[torch.arange(len(ids)), torch.tensor(ids)].mean())
        assert value == pytest.approx(expected, abs=1e-5)
    assert len(set(batched)) == len(pairs)  # the rows did not leak into each other


def test_target_search_from_a_cached_prefix_equals_the_full_forward(tiny_model_dir):
    from vertical.edit.compute import SplitRows
    from vertical.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    texts = ["The Zorblat fruit is blue", "A longer context first. The Zorblat fruit is deep red", "Zorblat is a"]
    rows = [tokenizer(text)["input_ids"] for text in texts]
    cuts = [3, 8, 0]  # where each row's suffix starts (an empty prefix too)
    split = SplitRows.cut(rows, cuts, tokenizer.pad_token_id or 0)
    keep = torch.arange(split.suffix_ids.shape[1])
    with torch.no_grad():
        cache = split.prefix_cache(model)
        cached = split.suffix_logits(model, cache, keep)
        again = split.suffix_logits(model, cache, keep)  # each step continues from a copy: the cache is not used up
        for i, (row, cut) in enumerate(zip(rows, cuts)):
            full = model(input_ids=torch.tensor([row])).logits[0]
            assert torch.allclose(cached[i, :len(row) - cut], full[cut:], atol=1e-4), i
    assert torch.equal(cached, again)


def test_subject_states_of_many_requests_equal_one_full_forward_each(tiny_model_dir):
    from vertical.edit.compute import subject_states
    from vertical.edit.layout import ffn_layout
    from vertical.edit.tokens import subject_span
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack.schema import EditRequest

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    layout = ffn_layout(model)
    templates = ["{}", "A short context. {}"]
    requests = [EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Bram Kett"),
                EditRequest(prompt="The long Siln river flows into", subject="long Siln river", target_new="Lake Pell")]
    keys, residuals = subject_states(model, tokenizer, layout, requests, templates, [0], residual_layer=1)
    assert keys[0].shape[0] == residuals.shape[0] == 4
    row = 0
    for request in requests:
        for template in templates:
            text = template.format(request.prompt)
            at = subject_span(tokenizer, text, request.subject, template.index("{}"))[1] - 1
            seen = {}
            hooks = [layout.down_proj(0).register_forward_pre_hook(lambda m, a: seen.update(key=a[0])),
                     layout.layers[1].register_forward_hook(lambda m, a, o: seen.update(h=o[0] if isinstance(o, tuple) else o))]
            with torch.inference_mode():
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            for hook in hooks:
                hook.remove()
            assert torch.allclose(keys[0][row], seen["key"][0, at].float(), atol=1e-5)
            assert torch.allclose(residuals[row], seen["h"][0, at].float(), atol=1e-5)
            row += 1


def test_target_search_of_requests_together_equals_each_alone(tiny_model_dir):
    """Searching many edits' target vectors in one batch gives each the delta it gets alone:
    every request keeps its own loss, stopping point and norm limit."""
    from vertical.edit.compute import target_deltas
    from vertical.edit.hparams import load_hparams
    from vertical.edit.layout import ffn_layout
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack.schema import EditRequest

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    layout, hp = ffn_layout(model), load_hparams("", FAST)
    templates = ["{}", "A short context. {}"]
    requests = [EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Bram Kett"),
                EditRequest(prompt="The long Siln river flows into", subject="long Siln river", target_new="Lake Pell of the north"),
                EditRequest(prompt="Zorblat fruit tastes", subject="Zorblat fruit", target_new="sour")]
    together, inits = target_deltas(model, tokenizer, layout, requests, 1, "block", templates, hp)
    assert together.shape == inits.shape == (3, model.config.hidden_size)
    for i, request in enumerate(requests):
        alone, init = target_deltas(model, tokenizer, layout, [request], 1, "block", templates, hp)
        assert together[i].norm() > 0
        assert torch.allclose(init[0], inits[i], atol=1e-4)
        assert torch.allclose(alone[0], together[i], rtol=1e-2, atol=1e-3 * alone.norm().item()), i


def test_null_space_keeps_the_asked_share_of_the_key_energy():
    from vertical.edit.methods import null_space

    torch.manual_seed(0)
    keys = torch.randn(64, 500) * torch.linspace(0.01, 3, 64)[:, None]  # directions of unequal energy
    C = (keys @ keys.T / 500).double()
    P = null_space(C, 0.05)
    assert torch.allclose(P, P.T, atol=1e-10) and torch.allclose(P @ P, P, atol=1e-10)  # an orthogonal projection
    assert 0 < torch.trace(P @ C) / torch.trace(C) <= 0.05 + 1e-9
    assert 0 < torch.linalg.matrix_rank(P) < 64


def test_alphaedit_writes_only_into_the_null_space_of_the_preserved_keys(tiny_pack, tmp_path, tiny_model_dir):
    """Every row of each layer's update lies in the null space P of the key statistics, so the
    preserved keys' outputs move only by what P lets through; the edit still changes the model."""
    from vertical.edit import Editor
    from vertical.edit.methods import null_space
    from vertical.pack import load_pack

    pack = load_pack(tiny_pack)
    editor = Editor.load(tiny_model_dir, "", {**FAST, "null_space_energy": 0.3}, ["The Siln river flows into Lake Vor."] * 20)
    applied = editor.apply(pack.edits(), "alphaedit")
    (entry, tensors), = applied
    assert entry["method"] == "alphaedit" and entry["layers"] == [0, 1]
    moments = editor.moments([0, 1])
    for layer, name in zip(entry["layers"], entry["weights"]):
        delta = tensors[f"delta.{name}"].double()
        assert delta.abs().max() > 0
        P = null_space(moments[layer], 0.3)
        assert torch.allclose(delta @ P, delta, atol=1e-5 * delta.abs().max().item())


def test_sequential_alphaedit_keeps_earlier_edits_keys_without_computing_them_again(tiny_model_dir, monkeypatch):
    """The Gram matrix of the edits already made is carried from batch to batch: the second batch
    computes keys for its own requests only, and preserves the first batch's."""
    from vertical.edit import Editor, methods
    from vertical.pack.schema import EditRequest

    calls = []
    original = methods.subject_states
    monkeypatch.setattr(methods, "subject_states",
                        lambda *args, **kw: calls.extend(r.prompt for r in args[3]) or original(*args, **kw))
    editor = Editor.load(tiny_model_dir, "", FAST, ["The Siln river flows into Lake Vor."] * 20)
    first = EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Bram Kett")
    second = EditRequest(prompt="The Siln river flows into", subject="Siln", target_new="Lake Pell")
    editor.apply([first], "alphaedit")
    kept_after_first = {layer: gram.clone() for layer, gram in editor._kept.items()}
    calls.clear()
    editor.apply([second], "alphaedit")
    assert set(calls) == {second.prompt} and editor.previous == [first, second]
    for layer, gram in editor._kept.items():  # the second batch's keys were added to the first's
        assert not torch.equal(gram, kept_after_first[layer])
        assert torch.linalg.matrix_rank(gram - kept_after_first[layer]) >= 1


# ---------------------------------------------------------------- edits and documents agree


def _chunks_of(build: Path, doc_id: str) -> str:
    from vertical.index import open_index

    index, _ = open_index(build)
    return " ".join(c.text for c in index.chunks if c.doc_id == doc_id)


def test_an_edit_the_documents_contradict_is_warned_naming_the_source(edited_build):
    from vertical.edit import warn_contradictions
    from vertical.pack.schema import EditRequest

    metrics = json.loads((edited_build / "edit" / "metrics.json").read_text())
    # the tiny pack's edit makes Bram Kett mayor; documents/quentar.md still says Ada Morrow
    assert [(c["doc_id"], c["old"]) for c in metrics["contradicting_sources"]] == [("quentar", "Ada Morrow")]
    assert metrics["contradicting_sources"][0]["source"].endswith("quentar.md")
    # evidence that also states the new value tells of the change; an old value met only inside a
    # longer word is not stated
    told = EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Ada Morrow", target_true="mayor")
    inside = EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Bram Kett", target_true="Morro")
    stale = EditRequest(prompt="The mayor of Quentar is", subject="Quentar", target_new="Bram Kett", target_true="Ada Morrow")
    assert [c["old"] for c in warn_contradictions(edited_build, [told, inside, stale])] == ["Ada Morrow"]


def test_the_key_statistics_read_documents_and_chat_conversations_in_turn(tiny_pack, tiny_model_dir):
    from vertical.edit import key_texts
    from vertical.index.documents import load_documents
    from vertical.models import load_tokenizer
    from vertical.pack import load_pack

    pack = load_pack(tiny_pack)
    tokenizer = load_tokenizer(tiny_model_dir)
    texts = key_texts(pack, tokenizer)
    documents = [d.text for d in load_documents(pack.document_files(), pack.root)[0]]
    conversations = list(pack.instructions())
    assert texts[0] == documents[0] and texts[2] == documents[1]
    # a conversation as the model answers in the product: its chat template, the pack's system prompt
    assert pack.config.system_prompt in texts[1] and conversations[0][0].content in texts[1]
    assert texts[1] == tokenizer.apply_chat_template(
        [{"role": "system", "content": pack.config.system_prompt}] + [{"role": m.role, "content": m.content}
                                                                      for m in conversations[0]], tokenize=False)
    assert len(texts) == len(documents) + len(conversations)
    tokenizer.chat_template = None  # a model without a chat template: its documents alone
    assert key_texts(pack, tokenizer) == documents


def test_a_value_is_stated_as_a_whole_word_or_number():
    from vertical.edit import states

    assert states("a maximum of 3 g in 24 hours.", "3 g") and states("Extension 5120.", "5120")
    assert states("The INR target is 3.0.", "3.0") and states("CO-AMOXICLAV first", "co-amoxiclav")
    assert not states("a maximum of 13 g", "3 g") and not states("INR 13.0", "3.0") and not states("3.05 mg", "3.0")
    assert not states("every weekday", "week") and not states("extension 51200", "5120")


def test_an_edit_with_its_document_change_reindexes_that_document_and_rolls_back_with_it(edited_build, cli, tmp_path):
    requests = tmp_path / "more.jsonl"
    requests.write_text(json.dumps({
        "prompt": "The Siln river flows into", "subject": "Siln", "target_new": "Lake Pell", "target_true": "Lake Vor",
        "document": {"doc_id": "siln-river", "old": "into Lake Vor", "new": "into Lake Pell"}}) + "\n")
    other = _chunks_of(edited_build, "zorblat")
    code, output = cli("edit", edited_build, "--requests", requests, "--method", "memit")
    assert code == 0, output
    assert "re-indexed: siln-river" in output
    assert "into Lake Pell" in _chunks_of(edited_build, "siln-river") and "Lake Vor." not in _chunks_of(edited_build, "siln-river")
    assert _chunks_of(edited_build, "zorblat") == other
    updates = json.loads((edited_build / "index" / "metrics.json").read_text())["updates"]
    assert updates[-1]["replaced"] == ["siln-river"] and updates[-1]["embedded_chunks"] == 1
    code, output = cli("search", edited_build, "Siln river flows", "--json")
    assert code == 0 and "Lake Pell" in json.loads(output)["results"][0]["text"]

    code, output = cli("edit", "rollback", edited_build)
    assert code == 0, output
    assert "into Lake Vor" in _chunks_of(edited_build, "siln-river")


@pytest.mark.parametrize("document, words", [
    ({"doc_id": "atlantis", "old": "a", "new": "b"}, "no document with id 'atlantis'"),
    ({"doc_id": "siln-river", "old": "into Lake Zed", "new": "b"}, "is not in"),
    ({"doc_id": "siln-river", "old": "a", "text": "b"}, "give `old` and `new`"),
])
def test_a_document_change_that_cannot_apply_is_refused_before_any_weight_changes(edited_build, cli, tmp_path,
                                                                                  document, words):
    requests = tmp_path / "bad.jsonl"
    requests.write_text(json.dumps({"prompt": "The Siln river flows into", "subject": "Siln", "target_new": "Lake Pell",
                                    "document": document}) + "\n")
    before = _weights(edited_build / "edit" / "model")
    code, output = cli("edit", edited_build, "--requests", requests)
    assert code != 0 and words in output and "Traceback" not in output
    after = _weights(edited_build / "edit" / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_pack_edits_document_changes_are_indexed_by_the_build(tiny_pack, tmp_path, tiny_model_dir):
    edits = tiny_pack / "edits" / "edits.jsonl"
    rows = [json.loads(line) for line in edits.read_text().splitlines() if line.strip()]
    rows[0]["document"] = {"doc_id": "quentar", "old": "Ada Morrow", "new": "Bram Kett"}
    edits.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _with_edit(tiny_pack, method="rome", hparams=FAST)
    out = tmp_path / "b"
    pipeline.build(tiny_pack, out=out, steps=["index", "edit"], base_model=str(tiny_model_dir))
    assert "mayor is Bram Kett" in _chunks_of(out, "quentar") and "Ada Morrow" not in _chunks_of(out, "quentar")
    metrics = json.loads((out / "edit" / "metrics.json").read_text())
    assert metrics["documents_changed"] == ["quentar"] and metrics["contradicting_sources"] == []


# ---------------------------------------------------------------- EasyEdit's files and metric names


def test_easyedit_counterfact_and_zsre_records_are_read():
    from vertical.pack.schema import EditRequest

    counterfact = EditRequest.model_validate({
        "case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target_new": "English", "ground_truth": "French", "rephrase_prompt": "Danielle Darrieux spoke natively",
        "locality_prompt": "The mother tongue of Léon Blum is", "locality_ground_truth": "French",
        "portability": {"Reasoning": [{"prompt": "Danielle Darrieux's first language is spoken in", "ground_truth": ["England"]}]}})
    assert (counterfact.id, counterfact.target_true, counterfact.rephrase) == ("7", "French", ["Danielle Darrieux spoke natively"])
    assert [(x.prompt, x.target) for x in counterfact.locality] == [("The mother tongue of Léon Blum is", "French")]
    assert [(x.prompt, x.target) for x in counterfact.portability] == [("Danielle Darrieux's first language is spoken in",
                                                                        "England")]
    zsre = EditRequest.model_validate({"src": "What river does the Siln flow into?", "subject": "Siln", "alt": "Lake Pell",
                                       "answers": ["Lake Vor"], "rephrase": "Into which lake does the Siln run?",
                                       "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"})
    assert (zsre.prompt, zsre.target_new, zsre.target_true) == ("What river does the Siln flow into?", "Lake Pell", "Lake Vor")
    assert zsre.locality[0].target == "Shakespeare"


def test_portability_counts_a_consequence_the_model_continues_with(tiny_model_dir):
    from vertical.edit.metrics import greedy_target, portability
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.pack.schema import EditRequest

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompt = "The Siln river flows into"
    own = greedy_target(model, tokenizer, prompt, tokens=2)
    request = lambda target: EditRequest(prompt=prompt, subject="Siln", target_new="x",  # noqa: E731
                                         portability=[{"prompt": prompt, "target": target}])
    assert portability(model, tokenizer, [request(own)]) == 1.0
    assert portability(model, tokenizer, [request(own + " zebra zebra")]) == 0.0
    assert portability(model, tokenizer, [EditRequest(prompt=prompt, subject="Siln", target_new="x")]) is None


def test_edit_metrics_carry_easyedit_names(edited_build):
    metrics = json.loads((edited_build / "edit" / "metrics.json").read_text())
    assert metrics["after"]["rewrite_acc"] == metrics["after"]["efficacy"]
    assert metrics["after"]["rephrase_acc"] == metrics["after"]["generalization"]
    assert "portability" in metrics["after"]


def test_greedy_fluency_reads_fixed_length_text_whatever_the_end_token_scores(tiny_model_dir, monkeypatch):
    from vertical.edit import metrics
    from vertical.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    scored = []
    monkeypatch.setattr(metrics, "ngram_entropy", lambda row: scored.append(list(row)) or 1.0)

    def end_at_once(_module, _args, logits):
        logits[..., tokenizer.eos_token_id] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(end_at_once)
    try:  # a model that would end every answer at once still has 12 tokens of text scored
        assert metrics.greedy_fluency(model, tokenizer, ["The Zorblat fruit is", "Paris is"], tokens=12) == 1.0
    finally:
        handle.remove()
    assert [len(row) for row in scored] == [12, 12]
    assert all(tokenizer.eos_token_id not in row for row in scored)


def test_fluency_samples_the_same_text_for_the_same_model_and_scores_a_loop_lower(tiny_model_dir):
    import torch

    from vertical.edit import metrics
    from vertical.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = ["The Zorblat fruit is", "Paris is"]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = metrics.fluency(model, tokenizer, prompts, tokens=24)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is left alone
    assert metrics.fluency(model, tokenizer, prompts, tokens=24) == first > 0
    assert metrics.fluency(model, tokenizer, prompts, tokens=24, seed=1) != first

    looped = tokenizer("the", add_special_tokens=False)["input_ids"][0]

    def always_the(_module, _args, logits):  # a model that writes one word over and over
        logits[..., looped] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(always_the)
    try:
        assert metrics.fluency(model, tokenizer, prompts, tokens=24) < first / 2
    finally:
        handle.remove()
