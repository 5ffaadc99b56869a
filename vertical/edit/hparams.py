"""The editing methods' hyperparameters for a model: the typed defaults (EditHyperParams, part of
the pack schema), then one YAML of tuned values per known model (vertical/edit/hparams/<model>.yaml),
then the pack's own settings; any other model gets the defaults and a traced layer."""

from __future__ import annotations

from pathlib import Path

import yaml

from vertical.pack.schema import EditHyperParams

HPARAMS_DIR = Path(__file__).with_name("hparams")


def load_hparams(model_name: str, overrides: dict | None = None) -> EditHyperParams:
    """Defaults, then the model's YAML if there is one, then the pack's settings."""
    values: dict = {}
    path = HPARAMS_DIR / f"{model_name}.yaml"
    if path.is_file():
        values.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return EditHyperParams(**values)
