"""Integration: the real default model exported to ONNX answers exactly as it does in PyTorch."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration

FACT = ("Clause 14.2 (Termination for convenience). The client may terminate this agreement for convenience "
        "on 45 days' written notice to the supplier. The supplier may not terminate for convenience.")


def test_fp32_bundle_model_decodes_as_pytorch_on_a_retrieval_prompt(default_model_dir, tmp_path):
    """Both decode plain greedy, as the QA scoring does. A repetition penalty in the runtime once made
    the bundle's answers differ and stop copying from the sources (legal short answers 0.35 -> 0.04)."""
    from vertical.scoring import OnnxLM, TorchLM
    from vertical.export.convert import export_language_model
    from vertical.export.runtime import OnnxChatModel
    from vertical.models import load_causal_lm, load_tokenizer
    from vertical.prompting import Source, build_messages

    folder = export_language_model(default_model_dir, tmp_path / "lm", "fp32", tmp_path)
    onnx_lm = OnnxLM(OnnxChatModel(folder))
    torch_lm = TorchLM(load_causal_lm(default_model_dir), load_tokenizer(default_model_dir), bf16=False)
    question = "On how many days' notice may the client terminate for convenience?"
    system = "You are a contract review assistant. Answer only from the numbered sources and cite them like [1]."
    messages = build_messages(system, question, [Source(1, "Template", "msa.md", 0, len(FACT), FACT)])
    assert onnx_lm.chat_ids(messages) == torch_lm.chat_ids(messages)
    answer = torch_lm.generate(messages, 32)
    assert len(answer) > 40 and onnx_lm.generate(messages, 32) == answer
    # the second, extractive reading scores spans alike: the runtime walks them as a trie, torch reads the trie in one pass
    ids = torch_lm.chat_ids(messages)
    paths = [torch_lm.piece_ids(text) for text in ("45 days [1]", "45 days' written notice [1]", "45 [1]", "Clause 14.2")]
    onnx_rows, torch_rows = onnx_lm.prefill(ids).follow(paths), torch_lm.prefill(ids).follow(paths)
    for onnx_row, torch_row in zip(onnx_rows, torch_rows):
        assert onnx_row == pytest.approx(torch_row, abs=2e-3)
