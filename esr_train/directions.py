"""A steering direction: a unit vector in a model's residual space, with what it means.

A direction knows its layer (``blocks.{L}.hook_resid_post`` convention, see
``esr_train.layers``), a human label (the concept or latent description), its source
(``concept``, ``sae`` or ``file``), the model it was made for, and optionally the
layer's *reference norm* (the median residual norm over non-first tokens of ordinary
text), so that ``strength`` can be given in units of that norm and mean the same thing on
any model. It is saved as one safetensors file whose header holds the JSON metadata.
"""

from __future__ import annotations

from esr_train.errors import EsrError
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

SOURCES = ("concept", "sae", "file")


class DirectionError(EsrError, ValueError):
    """A direction that does not fit the model, or a file that is not a direction."""


@dataclass
class SteeringDirection:
    vector: torch.Tensor
    layer: int
    label: str
    source: str = "file"
    model_id: str | None = None
    reference_norm: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vec = torch.as_tensor(self.vector).detach().float().flatten().cpu()
        norm = vec.norm().item()
        if not vec.numel() or norm == 0 or not torch.isfinite(vec).all():
            raise DirectionError(f"direction {self.label!r} is empty, zero or not finite")
        # A vector that is already unit (one this class made, saved and loaded again) is kept
        # bit for bit: dividing by its float32 norm once more can move the last bits, so a
        # direction copied through load and save would no longer equal its source.
        self.vector = vec if abs(norm - 1.0) <= 1e-6 else vec / norm
        if self.source not in SOURCES:
            raise DirectionError(f"unknown direction source {self.source!r}; valid: {', '.join(SOURCES)}")
        if self.layer < 0:
            raise DirectionError(f"direction {self.label!r}: layer must be >= 0, got {self.layer}")

    @property
    def dim(self) -> int:
        return self.vector.numel()

    def coefficient(self, strength: float, unit: str = "norm") -> float:
        """The raw multiple of the unit vector added to the residual stream.

        ``unit="norm"``: ``strength`` x the layer's reference norm (so 0.5 means half a
        typical residual). ``unit="raw"``: ``strength`` itself.
        """
        if unit == "raw":
            return float(strength)
        if unit != "norm":
            raise DirectionError(f"unknown strength unit {unit!r}; valid: norm, raw")
        if self.reference_norm is None:
            raise DirectionError(
                f"direction {self.label!r} has no reference norm; measure one with "
                "esr_train.concepts.with_reference_norm(direction, model, tokenizer) or use unit='raw'"
            )
        return float(strength) * self.reference_norm

    def with_reference_norm(self, norm: float) -> "SteeringDirection":
        return replace(self, reference_norm=float(norm))

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(".safetensors")
        meta = {
            "layer": self.layer, "label": self.label, "source": self.source,
            "model_id": self.model_id, "reference_norm": self.reference_norm,
            "metadata": self.metadata,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"direction": self.vector.contiguous()}, str(tmp), metadata={"esr_direction": json.dumps(meta)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SteeringDirection":
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                vector = fh.get_tensor("direction")
        except FileNotFoundError:
            raise DirectionError(f"{path}: no such direction file") from None
        except Exception as exc:  # safetensors raises its own error types
            raise DirectionError(f"{path}: not a steering direction ({exc})") from None
        if "esr_direction" not in header:
            raise DirectionError(f"{path}: safetensors file without esr_direction metadata; use load_vector_file(path, layer=...)")
        meta = json.loads(header["esr_direction"])
        return cls(vector=vector, **meta)


def load_vector_file(path: str | Path, layer: int, label: str | None = None, key: str | None = None) -> SteeringDirection:
    """A raw vector from ``.safetensors`` / ``.pt`` / ``.npy`` with a stated layer.

    A file saved by ``SteeringDirection.save`` keeps its own metadata (``layer`` must then
    agree). For other files the tensor must be 1-D, or ``key`` names it in a dict."""
    path = Path(path)
    if not path.exists():
        raise DirectionError(f"{path}: no such vector file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            saved = SteeringDirection.load(path)
        except DirectionError:
            saved = None
        if saved is not None:
            return _checked_layer(saved, layer, path)
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise DirectionError(f"{path}: not a readable .safetensors file ({type(exc).__name__})") from None
    elif suffix in (".pt", ".pth"):
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's own message advises unsafe loading; say what is wrong instead
            raise DirectionError(f"{path}: not a readable tensor file ({type(exc).__name__}); save the vector "
                                 "with torch.save(tensor, path) or as .safetensors") from None
    elif suffix == ".npy":
        import numpy as np

        try:
            tensors = torch.from_numpy(np.load(str(path)))
        except Exception as exc:
            raise DirectionError(f"{path}: not a readable .npy array ({type(exc).__name__})") from None
    else:
        raise DirectionError(f"{path}: unsupported vector file type {suffix!r}; use .safetensors, .pt or .npy")
    if isinstance(tensors, dict):
        if key is None:
            if len(tensors) != 1:
                raise DirectionError(f"{path}: holds tensors {sorted(tensors)}; name one with key=")
            key = next(iter(tensors))
        if key not in tensors:
            raise DirectionError(f"{path}: no tensor named {key!r}; it holds {sorted(tensors)}")
        tensors = tensors[key]
    vec = torch.as_tensor(tensors)
    if vec.dim() != 1:
        raise DirectionError(f"{path}: expected a 1-D vector, got shape {tuple(vec.shape)}")
    return SteeringDirection(vector=vec, layer=int(layer), label=label or path.stem, source="file",
                             metadata={"file": str(path)})


def _checked_layer(direction: SteeringDirection, layer: int, path: Path) -> SteeringDirection:
    if layer is not None and int(layer) != direction.layer:
        raise DirectionError(f"{path}: saved for layer {direction.layer}, not layer {layer}")
    return direction


def check_direction(model, direction: SteeringDirection) -> None:
    """Fail before any generation when a direction does not fit ``model``."""
    from esr_train.layers import hidden_size, resolve_layer

    width = hidden_size(model)
    if direction.dim != width:
        raise DirectionError(
            f"direction {direction.label!r} has width {direction.dim}, but the model's residual stream has width {width}"
        )
    resolve_layer(model, direction.layer)
