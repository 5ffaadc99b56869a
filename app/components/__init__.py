"""One module per tab of the demo, each with a `create_*_tab` function that builds the tab's
widgets and wires its events inside an open `gr.Tab`."""

from vertical.app.components.chat import create_chat_tab
from vertical.app.components.compare import create_compare_tab
from vertical.app.components.editing import create_editing_tab
from vertical.app.components.knowledge import create_knowledge_tab
from vertical.app.components.report import create_report_tab

__all__ = ["create_chat_tab", "create_compare_tab", "create_editing_tab", "create_knowledge_tab",
           "create_report_tab"]
