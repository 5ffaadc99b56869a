"""The Knowledge editing tab (builds only, not read-only): write a changed fact into the model's
FFN weights with ROME, compare the completion before and after, roll back, and trace where a fact
is stored."""

import tempfile
from pathlib import Path

from vertical.app.common import DemoSource, user_error, friendly


def complete(source: DemoSource, prompt: str) -> str:
    """The model's greedy continuation of a fact prompt (what ROME edits)."""
    import torch

    chat = source.assistant.model
    ids = chat.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = chat.model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=chat.tokenizer.pad_token_id)
    return prompt + chat.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)


@friendly
def apply_edit(source: DemoSource, prompt: str, subject: str, target: str) -> tuple[str, str, list[list]]:
    """Apply one ROME edit to the build: the completion before, after, and the edit's checks."""
    from vertical.edit import edit_build
    from vertical.pack.schema import EditRequest

    try:
        request = EditRequest(prompt=prompt, subject=subject, target_new=target)
    except ValueError as exc:
        raise user_error(exc) from None
    with source.lock, tempfile.TemporaryDirectory() as scratch:
        before = complete(source, prompt)
        requests = Path(scratch) / "edit.jsonl"
        requests.write_text(request.model_dump_json(exclude_none=True) + "\n")
        metrics = edit_build(source.path, requests, "rome")
        source.reload_model()
        after = complete(source, prompt)
    rows = [[key, metrics["before"].get(key), metrics["after"].get(key)]
            for key in ("efficacy", "generalization", "locality", "fluency", "fluency_greedy")]
    return before, after, rows


@friendly
def roll_back(source: DemoSource, prompt: str) -> str:
    """Undo the build's last edit and show the prompt's completion with the restored weights."""
    from vertical.edit import rollback

    with source.lock:
        undone = rollback(source.path)
        source.reload_model()
        answer = complete(source, prompt) if prompt.strip() else ""
    return f"Rolled back {', '.join(undone)}. " + (f"Now: {answer}" if answer else "")


@friendly
def trace(source: DemoSource, prompt: str, subject: str) -> str:
    """The path of a causal-trace heatmap of the MLP layers for the prompt's subject."""
    from vertical.edit.trace import trace_build

    with source.lock:
        png, _ = trace_build(source.path, prompt, subject, "mlp")
    return str(png)


def create_editing_tab(source: DemoSource) -> None:
    """The Knowledge editing tab's widgets and events; call it inside `with gr.Tab(...)`."""
    import gradio as gr

    gr.Markdown("Write a changed fact into the model's FFN weights with ROME, see the answer before "
                "and after, and roll it back. The edit is saved in the build's edit log.")
    with gr.Row():
        edit_prompt = gr.Textbox(label="Prompt", placeholder="The mayor of Quentar is",
                                 elem_id="edit-prompt")
        edit_subject = gr.Textbox(label="Subject (as in the prompt)", placeholder="Quentar",
                                  elem_id="edit-subject")
        edit_target = gr.Textbox(label="New target", placeholder="Osric", elem_id="edit-target")
    with gr.Row():
        apply_button = gr.Button("Apply edit (ROME)", variant="primary", elem_id="apply-edit")
        rollback_button = gr.Button("Roll back the last edit", elem_id="rollback")
        trace_button = gr.Button("Causal trace", elem_id="trace")
    before_out = gr.Textbox(label="Before", elem_id="edit-before")
    after_out = gr.Textbox(label="After", elem_id="edit-after")
    edit_table = gr.Dataframe(headers=["metric", "before", "after"], elem_id="edit-checks", label="Edit checks "
                              "(efficacy: the new target wins; locality: unrelated facts unchanged)")
    rollback_out = gr.Markdown(elem_id="rollback-note")
    heatmap = gr.Image(label="Causal trace: where the fact is stored", type="filepath", elem_id="trace-image")
    apply_button.click(lambda p, s, t: apply_edit(source, p, s, t), [edit_prompt, edit_subject, edit_target],
                       [before_out, after_out, edit_table])
    rollback_button.click(lambda p: roll_back(source, p), edit_prompt, rollback_out)
    trace_button.click(lambda p, s: trace(source, p, s), [edit_prompt, edit_subject], heatmap)
