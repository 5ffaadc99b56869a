"""The Side by side tab (builds only): one question to the base model without documents, the
vertical model with retrieval and, where the build has one, the distilled student."""

from vertical.app.common import EMPTY_ANSWER, MAX_TOKENS, DemoSource, friendly, inert, render_answer


@friendly
def compare(source: DemoSource, question: str) -> tuple[str, str, str]:
    """The three answers to `question`, rendered as Markdown: base, vertical, student."""
    from vertical.prompting import build_messages

    question = (question or "").strip()
    if not question:
        return "", "", ""
    models = source.side_models()
    base = models["base"].generate(build_messages(source.assistant.system_prompt, question, None), MAX_TOKENS)
    vertical = render_answer(source.assistant.ask(question, max_new_tokens=MAX_TOKENS))
    student = "(this build has no distilled student)"
    if "student" in models:
        answer, messages = source.assistant.prepare(question)
        if messages is not None:
            answer.text = models["student"].generate(messages, MAX_TOKENS, answer.numbers())
            source.assistant.finish(answer)
            source.assistant.reread(answer, messages, models["student"])
        student = render_answer(answer)
    return inert(base.strip() or EMPTY_ANSWER), vertical, student


def create_compare_tab(source: DemoSource) -> None:
    """The Side by side tab's widgets and events; call it inside `with gr.Tab(...)`."""
    import gradio as gr

    gr.Markdown("The same question to the base model (no documents), the vertical model (with "
                "retrieval) and, if the build has one, the distilled student.")
    compare_question = gr.Textbox(label="Question", elem_id="compare-question")
    compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Base model, no documents")
            base_out = gr.Markdown(elem_id="base-answer")
        with gr.Column():
            gr.Markdown("#### Vertical model, with retrieval")
            vertical_out = gr.Markdown(elem_id="vertical-answer")
        with gr.Column():
            gr.Markdown("#### Distilled student, with retrieval")
            student_out = gr.Markdown(elem_id="student-answer")
    compare_button.click(lambda q: compare(source, q), compare_question,
                         [base_out, vertical_out, student_out])
