"""Typed hyperparameters of the editing methods, with one YAML of tuned values per known model
(vertical/edit/hparams/<model>.yaml); any other model gets the defaults and a traced layer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

HPARAMS_DIR = Path(__file__).with_name("hparams")


class EditHyperParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # where: ROME edits `layer`; MEMIT spreads a batch over `layers`; "auto" = from a causal trace
    layer: int | Literal["auto"] = "auto"
    layers: list[int] | Literal["auto"] = "auto"
    memit_span: int = Field(5, ge=1, description="layers MEMIT uses around the traced layer when layers is auto")
    # the target vector: gradient steps on a delta added at the last subject token
    v_steps: int = Field(25, ge=1, le=500)
    v_lr: float = Field(0.5, gt=0)
    v_weight_decay: float = Field(0.5, ge=0)
    kl_factor: float = Field(0.0625, ge=0)
    clamp_norm_factor: float = Field(4.0, gt=0)
    context_templates: int = Field(5, ge=0, le=50, description="random prefixes the edit must hold under")
    context_tokens: int = Field(10, ge=2, le=40)
    # protecting other knowledge: second moment of FFN keys, from pack documents + generic text
    mom2: Literal["stats", "identity"] = "stats"
    mom2_tokens: int = Field(20000, ge=1000, description="tokens of text for the key statistics")
    mom2_update_weight: float = Field(15000.0, gt=0, description="MEMIT's lambda on the key covariance")
    # AlphaEdit: how much of the preserved keys' energy the update may touch, and its ridge
    null_space_energy: float = Field(0.05, gt=0, le=1, description="share of the key second moment, smallest "
                                     "directions first, that spans the null space AlphaEdit writes into")
    alphaedit_ridge: float = Field(0.1, gt=0, description="ridge, relative to the mean diagonal of P K K^T")
    # fine-tuning baseline
    ft_steps: int = Field(25, ge=1)
    ft_lr: float = Field(5e-4, gt=0)
    ft_norm_constraint: float = Field(5e-4, ge=0, description="max change of any weight entry (L-inf)")
    seed: int = 0


    @field_validator("layers")
    @classmethod
    def _increasing(cls, value):
        # MEMIT targets the last listed layer and spreads the change over the ones below it
        if isinstance(value, list) and (not value or any(b <= a for a, b in zip(value, value[1:]))):
            raise ValueError("layers must be a non-empty list of increasing layer numbers, e.g. [4, 5, 6, 7, 8]")
        return value


def load_hparams(model_name: str, overrides: dict | None = None) -> EditHyperParams:
    """Defaults, then the model's YAML if there is one, then the pack's settings."""
    values: dict = {}
    path = HPARAMS_DIR / f"{model_name}.yaml"
    if path.is_file():
        values.update(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return EditHyperParams(**values)
