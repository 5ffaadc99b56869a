"""Shared fixtures: a tiny randomly initialised Llama-shaped model (no download) and a tiny pack.

The tiny model has a real byte-level BPE tokenizer trained here on the fixture pack's text and a
ChatML chat template like SmolLM2's, so the code paths match the real default model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# The slow tier (`pytest -m slow`): whole builds, the real default model, the browser, kills and
# torchrun. `pytest -q` runs the rest, the unit tier; `.ci/run` runs both.
SLOW_FIXTURES = {"exported_build", "default_model_dir", "browser"}


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("integration") or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """Every test gets its own model cache and builds folder; nothing touches ~/.cache."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("VERTICAL_CACHE", str(root / "cache"))
    monkeypatch.setenv("VERTICAL_BUILDS", str(root / "builds"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_tiny_model(out: Path, layers: int = 2, hidden: int = 64, vocab: int = 600) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [p.read_text(encoding="utf-8") for p in sorted((DATA / "tiny_pack").rglob("*")) if p.is_file()]
    corpus += ["The quick brown fox jumps over the lazy dog. " * 3, "0123456789 []().,:;!?"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def tiny_pack(tmp_path) -> Path:
    """A writable copy of the tiny pack."""
    return Path(shutil.copytree(DATA / "tiny_pack", tmp_path / "tiny_pack"))


@pytest.fixture
def cli():
    """Run the CLI in-process: returns (exit code, stdout + stderr)."""
    from vertical import cli as cli_module

    def run(*args: str, capsys=None) -> tuple[int, str]:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from rich.console import Console

        buffer = io.StringIO()
        old = cli_module.console, cli_module.err_console
        cli_module.console = cli_module.err_console = Console(file=buffer, width=200, no_color=True)
        try:
            with redirect_stdout(buffer), redirect_stderr(buffer):
                code = cli_module.main([str(a) for a in args])
        finally:
            cli_module.console, cli_module.err_console = old
        return code, buffer.getvalue()

    return run


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The real default base model, converted once per test session into its own cache."""
    import os

    from vertical.models import ensure_local, resolve_base_model

    old = os.environ.get("VERTICAL_CACHE")
    os.environ["VERTICAL_CACHE"] = str(tmp_path_factory.mktemp("session-cache"))
    try:
        return ensure_local(resolve_base_model("smollm2-135m-instruct"))
    finally:
        if old is None:
            del os.environ["VERTICAL_CACHE"]
        else:
            os.environ["VERTICAL_CACHE"] = old


FAST_EDIT = {"layer": 1, "layers": [0, 1], "context_templates": 2, "context_tokens": 4, "v_steps": 10, "mom2_tokens": 1000}


def fast_pack(root: Path, **stages) -> Path:
    """A copy of the tiny pack with stage settings small enough for the test suite."""
    import yaml

    pack = Path(shutil.copytree(DATA / "tiny_pack", root / "tiny_pack"))
    config = yaml.safe_load((pack / "pack.yaml").read_text())
    config["stages"].update({"edit": {"method": "rome", "hparams": FAST_EDIT},
                             "distill": {"steps": 30, "teacher_answers": 4, "answer_tokens": 16, "documents": 4,
                                         "keep_layers": 0.5, "learning_rate": 1e-3},
                             "export": {"agreement_prompts": 2}, **stages})
    (pack / "pack.yaml").write_text(yaml.safe_dump(config))
    return pack


@pytest.fixture(scope="session")
def exported_build(tmp_path_factory) -> Path:
    """A tiny build taken through edit, distill and export once per session (about a minute)."""
    from vertical import pipeline

    root = tmp_path_factory.mktemp("exported")
    model = make_tiny_model(root / "model", layers=4)
    # a random tiny teacher scores 0, so no retention can be measured: the student is asked for by name
    pack = fast_pack(root, export={"agreement_prompts": 2, "model": "student"})
    pipeline.build(pack, out=root / "build", steps=["edit", "distill", "export"], base_model=str(model))
    return root / "build"
