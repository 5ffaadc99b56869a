"""Where a model keeps its FFN memories: the decoder layers, each layer's MLP and its output
("down") projection. Read from the model's modules, not hard-coded to one checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from vertical.errors import VerticalError


@dataclass
class FFNLayout:
    """Decoder layers of a Llama-style model (Llama, Qwen2/3, Mistral, Gemma, SmolLM): each layer
    has `mlp.down_proj`, a Linear whose input is the FFN key (act(gate(x)) * up(x)) and whose
    output is added to the residual stream."""

    model_type: str
    layers: list  # the decoder layer modules, bottom to top

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def mlp(self, layer: int):
        return self.layers[layer].mlp

    def down_proj(self, layer: int):
        return self.layers[layer].mlp.down_proj

    def weight_name(self, model, layer: int) -> str:
        target = self.down_proj(layer).weight
        for name, parameter in model.named_parameters():
            if parameter is target:
                return name
        raise VerticalError(f"layer {layer}: down projection weight not found among the model's parameters")


def ffn_layout(model) -> FFNLayout:
    import torch

    model_type = getattr(model.config, "model_type", type(model).__name__)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not len(layers):
        raise VerticalError(f"model family '{model_type}' has no known FFN layout: expected decoder layers "
                            "(model.model.layers) as in Llama, Qwen, Mistral or Gemma")
    for i, layer in enumerate(layers):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if not isinstance(down, torch.nn.Linear):
            raise VerticalError(f"model family '{model_type}' has no known FFN layout: layer {i} has no "
                                "mlp.down_proj Linear (supported: Llama, Qwen2/3, Mistral, Gemma families)")
    return FFNLayout(model_type=model_type, layers=list(layers))
