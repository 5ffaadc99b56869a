"""Gradio demo (imported as vertical.app)."""
