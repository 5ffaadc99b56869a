"""vertical: turn a small general language model into a private, domain-specific model.

Importing the package makes the process offline by default: nothing is fetched from a model
hub unless the user sets HF_HUB_OFFLINE=0 themselves.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", os.environ["HF_HUB_OFFLINE"])
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

__version__ = "0.1.0"
