"""Checks a command makes before it loads a model or writes anything.

Each function raises an :class:`~esr_train.errors.EsrError` subclass with one line naming
the flag or file and the fix, and writes nothing, so a corrected command can run into the
same ``--out`` at once.
"""

from __future__ import annotations

from pathlib import Path

from esr_train.errors import EsrError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class InputError(EsrError, ValueError):
    """A path or value a command was given that cannot work."""


def check_out_path(path: str | Path, flag: str = "--out") -> Path:
    """``path`` can be a run directory: absent, or an existing directory (not a file)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: is a file, not a directory; give a directory path")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return path


def check_adapter_dir(path: str | Path, flag: str = "--adapter") -> Path:
    """``path`` holds a finished PEFT adapter: a directory with ``adapter_config.json`` and
    its weights (a folder with the config alone is an interrupted save, which PEFT would
    otherwise take for a hub id and try to download)."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{flag} {path}: no such adapter directory")
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{flag} {path}: not an adapter (no adapter_config.json); give the folder esr train wrote")
    if not any((path / w).is_file() for w in ADAPTER_WEIGHTS):
        raise InputError(f"{flag} {path}: has adapter_config.json but no {ADAPTER_WEIGHTS[0]}; "
                         "the adapter was not saved to the end (train it again or use a checkpoint)")
    return path


def model_shape(name_or_path: str, model=None) -> tuple[int, int] | None:
    """(decoder layers, residual width) of a model from its config alone (the weights are
    not loaded); ``model`` when one is already loaded. None for a hub id, which may need the
    network to read (those are checked once loaded)."""
    if model is not None:
        from esr_train.layers import hidden_size, num_layers

        return num_layers(model), hidden_size(model)
    from esr_train.zoo import ZOO, resolve_model_path

    if name_or_path not in ZOO and not Path(name_or_path).is_dir():
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers), int(text.hidden_size)


def check_layer(layer: int | None, n_layers: int, field: str = "--layer") -> None:
    if layer is not None and not 0 <= int(layer) < n_layers:
        raise InputError(f"{field} {layer}: out of range; the model has decoder layers 0-{n_layers - 1}")


def check_vector_file(path: str | Path, layer: int, width: int | None, field: str = "--vector"):
    """The direction in ``path`` (see ``esr_train.directions.load_vector_file``), checked to
    have the model's residual width."""
    from esr_train.directions import load_vector_file

    direction = load_vector_file(path, layer)
    if width is not None and direction.dim != width:
        raise InputError(f"{field} {path}: a vector of width {direction.dim}, but the model's residual stream has "
                         f"width {width}")
    return direction
