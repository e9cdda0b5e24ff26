"""One tested mapping from layer numbers and hook names to modules.

Convention (stated once, used everywhere): layer ``L`` is the *output* of decoder layer
``L``, counted from 0; this is sae-lens / TransformerLens ``blocks.{L}.hook_resid_post``.
``blocks.{L}.hook_resid_pre`` is the input of layer L, i.e. the output of layer L-1.
Negative numbers count from the end. The same holds for Llama and Gemma models, plain or
wrapped by PEFT.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import re

from torch import nn

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


class LayerError(EsrError, ValueError):
    """A layer number or hook name that does not exist in the model."""


def _find_layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) > 0:
            if type(module[0]).__name__.endswith("DecoderLayer"):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise LayerError(
            f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList "
            "named '...layers' of *DecoderLayer modules (Llama, Gemma, Mistral, Qwen style)"
        )
    return best


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers (also inside PEFT wrappers)."""
    return _find_layer_list(model)[1]


def decoder_module(model: nn.Module) -> nn.Module:
    """The module that owns the decoder layers (``LlamaModel``, ``Gemma3TextModel``...);
    its forward receives the 2-D attention mask, from which absolute positions follow."""
    name, _ = _find_layer_list(model)
    parent_name = name.rsplit(".", 1)[0] if "." in name else ""
    return model.get_submodule(parent_name) if parent_name else model


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "hidden_size", None)
    if size is None:
        raise LayerError(f"cannot read hidden_size from the config of {type(model).__name__}")
    return int(size)


def resolve_layer(model: nn.Module, layer: int | str) -> int:
    """Turn an int (negative allowed) or a ``blocks.{L}.hook_resid_post|pre`` name into a
    layer index in ``[0, num_layers)``, or raise a LayerError that names the valid range."""
    n = num_layers(model)
    if isinstance(layer, str):
        index = layer_from_hook_name(layer)
    else:
        index = int(layer)
        if index < 0:
            index += n
    if not 0 <= index < n:
        raise LayerError(f"layer {layer!r} is outside the model: it has {n} decoder layers (0..{n - 1})")
    return index


def layer_from_hook_name(hook_name: str) -> int:
    """``blocks.L.hook_resid_post`` -> L; ``blocks.L.hook_resid_pre`` -> L-1."""
    match = _HOOK_RE.match(hook_name.strip())
    if not match:
        raise LayerError(
            f"unsupported hook name {hook_name!r}: steering needs a residual-stream hook, "
            "'blocks.{L}.hook_resid_post' or 'blocks.{L}.hook_resid_pre'"
        )
    index, kind = int(match.group(1)), match.group(2)
    if kind == "pre":
        if index == 0:
            raise LayerError("'blocks.0.hook_resid_pre' is the embedding output; steer at resid_post of a layer instead")
        index -= 1
    return index


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"
