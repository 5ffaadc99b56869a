"""The Chat tab: streaming answers with expandable numbered citations, the pack's disclaimer and
example questions, thumbs up/down and corrections saved to the feedback log."""

import html
from collections.abc import Iterator
from typing import Any

from vertical.app.common import MAX_TOKENS, DemoSource, friendly, inert, render_answer


@friendly
def chat_reply(source: DemoSource, question: str, history: list[dict],
               exchanges: list[dict] | None = None) -> Iterator[tuple[list[dict], str, list[dict]]]:
    """Stream an answer into the chat history (messages format); citations appear when it ends.
    Each finished exchange is also appended to `exchanges`, the session's server-side record
    that feedback is taken from (the history comes back from the browser, which can rewrite it)."""
    exchanges = [] if exchanges is None else exchanges
    question = (question or "").strip()
    if not question:
        yield history, "", exchanges
        return
    turns = [{"role": m["role"], "content": _plain(m["content"])} for m in history if m["role"] in ("user", "assistant")]
    history = history + [{"role": "user", "content": question}, {"role": "assistant", "content": "…"}]
    yield history, "", exchanges
    answer, pieces = source.assistant.stream(question, max_new_tokens=MAX_TOKENS, history=turns[-6:])
    text = ""
    for piece in pieces:
        text += piece
        history[-1] = {"role": "assistant", "content": inert(text)}
        yield history, "", exchanges
    history[-1] = {"role": "assistant", "content": render_answer(answer)}
    exchanges = exchanges + [{"question": question, "answer": answer.text}]
    yield history, "", exchanges


def _plain(content: Any) -> str:
    """A chat message's text without the rendered citation blocks (Gradio 6 sends content back as
    a list of typed parts)."""
    if isinstance(content, list):
        content = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    text = content if isinstance(content, str) else str(content)
    return html.unescape(text.split("\n\n<details", 1)[0])


@friendly
def record_rating(source: DemoSource, history: list[dict], like: Any, exchanges: list[dict]) -> str:
    """Thumbs up or down for the answer clicked: the n-th assistant message is the session's n-th
    exchange, so what is saved is what the model said, whatever the browser sends back."""
    from vertical.feedback import Feedback, record

    index = like.index if isinstance(like.index, int) else like.index[0]
    number = sum(1 for m in history[:index + 1] if m["role"] == "assistant") - 1
    if not 0 <= number < len(exchanges):
        return "Nothing to rate yet."
    exchange = exchanges[number]
    record(source.feedback_dir, Feedback(question=exchange["question"], answer=exchange["answer"],
                                         rating="up" if like.liked else "down", model=source.assistant.name),
           source.redact_feedback)
    return f"Thanks: recorded thumbs {'up' if like.liked else 'down'}."


@friendly
def record_correction(source: DemoSource, exchanges: list[dict], correction: str, subject: str) -> str:
    """Save the answer the last exchange should have given (and, with a subject, an edit request)."""
    from vertical.feedback import Feedback, record

    if not exchanges or not (correction or "").strip():
        return "Ask a question first, then write the answer it should have given."
    last = exchanges[-1]
    record(source.feedback_dir, Feedback(question=last["question"], answer=last["answer"], rating="down",
                                         correction=correction.strip(), subject=(subject or "").strip() or None,
                                         model=source.assistant.name), source.redact_feedback)
    return "Correction saved; `vertical feedback export` turns it into training and edit data."


def create_chat_tab(source: DemoSource) -> None:
    """The Chat tab's widgets and events; call it inside `with gr.Tab(...)`."""
    import gradio as gr

    if source.assistant.disclaimer:
        gr.Markdown(f"*{source.assistant.disclaimer}*", elem_id="disclaimer")
    chatbot = gr.Chatbot(label="Answers with numbered sources", height=420, elem_id="chatbot",
                         sanitize_html=True)
    question = gr.Textbox(label="Question", placeholder="Ask about the documents…", elem_id="question")
    with gr.Row():
        ask = gr.Button("Ask", variant="primary", elem_id="ask")
        clear = gr.Button("Clear")
    if source.examples:
        gr.Examples(source.examples, inputs=question, label="Example questions")
    with gr.Accordion("Correct the last answer", open=False):
        correction = gr.Textbox(label="What the answer should have said", elem_id="correction")
        subject = gr.Textbox(label="The fact's subject, as it occurs in the question (optional: makes an "
                                   "edit request)")
        save = gr.Button("Save correction", elem_id="save-correction")
    feedback_note = gr.Markdown(elem_id="feedback-note")
    exchanges = gr.State([])  # held on the server, per browser session
    ask.click(lambda q, h, e: (yield from chat_reply(source, q, h, e)), [question, chatbot, exchanges],
              [chatbot, question, exchanges])
    question.submit(lambda q, h, e: (yield from chat_reply(source, q, h, e)), [question, chatbot, exchanges],
                    [chatbot, question, exchanges])
    clear.click(lambda: ([], []), None, [chatbot, exchanges])

    def on_like(history: list[dict], exchanges: list[dict], like: gr.LikeData) -> str:  # found by annotation
        return record_rating(source, history, like, exchanges)

    chatbot.like(on_like, [chatbot, exchanges], feedback_note)
    save.click(lambda e, c, s: record_correction(source, e, c, s), [exchanges, correction, subject],
               feedback_note)
