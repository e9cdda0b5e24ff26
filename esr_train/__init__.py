"""esr-train core: offline model zoo, steering directions and the hooks that apply them.

The public API is flat; heavy dependencies (torch, transformers) load on first use of a
submodule, so ``import esr_train`` and ``esr --help`` stay instant.
"""

__version__ = "0.1.0"

__all__ = [
    "load_model",
    "prepare_model",
    "list_models",
    "resolve_dtype",
    "SteeringDirection",
    "Schedule",
    "steer",
    "concept_direction",
    "load_sae",
    "sae_direction",
]

_LAZY = {
    "load_model": "esr_train.zoo",
    "prepare_model": "esr_train.zoo",
    "list_models": "esr_train.zoo",
    "resolve_dtype": "esr_train.dtype",
    "SteeringDirection": "esr_train.directions",
    "Schedule": "esr_train.steering",
    "steer": "esr_train.steering",
    "concept_direction": "esr_train.concepts",
    "load_sae": "esr_train.sae",
    "sae_direction": "esr_train.sae",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'esr_train' has no attribute {name!r}")
