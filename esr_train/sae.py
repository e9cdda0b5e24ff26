"""SAE latents as steering directions, through sae-lens.

``load_sae(release, sae_id)`` loads a sae-lens registry release (Gemma Scope, Llama Scope:
GPU users with internet); ``load_sae(path)`` loads a directory written by
``SAE.save_model`` (``cfg.json`` + ``sae_weights.safetensors``). A latent's direction is
its decoder row; its layer comes from the SAE's own hook name
(``blocks.{L}.hook_resid_post``, see ``esr_train.layers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from esr_train.directions import DirectionError, SteeringDirection
from esr_train.layers import layer_from_hook_name


def load_sae(release_or_path: str | Path, sae_id: str | None = None, device: str = "cpu"):
    """A sae-lens SAE from a local directory or a (release, sae_id) pair."""
    from sae_lens import SAE

    path = Path(release_or_path)
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise DirectionError(f"{path}: not a sae-lens SAE directory (no cfg.json)")
        return SAE.load_from_disk(str(path), device=device)
    if sae_id is None:
        raise DirectionError(
            f"{release_or_path!r} is not a directory; a sae-lens release also needs sae_id "
            "(e.g. release 'gemma-scope-2b-pt-res-canonical', sae_id 'layer_16/width_16k/canonical')"
        )
    try:
        return SAE.from_pretrained(str(release_or_path), sae_id, device=device)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DirectionError(f"cannot load SAE {release_or_path}/{sae_id}: {first}") from None


def sae_hook_name(sae) -> str:
    name = sae.cfg.metadata.hook_name
    if not name:
        raise DirectionError("the SAE's config names no hook (cfg.metadata.hook_name); cannot tell its layer")
    return name


def sae_layer(sae) -> int:
    return layer_from_hook_name(sae_hook_name(sae))


def sae_direction(sae, latent: int, label: str | None = None, model_id: str | None = None) -> SteeringDirection:
    """The unit decoder direction of ``latent`` at the SAE's layer."""
    d_sae = sae.W_dec.shape[0]
    if not 0 <= latent < d_sae:
        raise DirectionError(f"latent {latent} is outside the SAE (d_sae={d_sae})")
    return SteeringDirection(
        vector=sae.W_dec[latent].detach().float().cpu(),
        layer=sae_layer(sae),
        label=label or f"latent {latent}",
        source="sae",
        model_id=model_id or sae.cfg.metadata.model_name,
        metadata={"latent": int(latent), "hook_name": sae_hook_name(sae), "d_sae": int(d_sae)},
    )


@torch.inference_mode()
def most_active_latents(sae, model, tokenizer, prompts: Sequence[str], k: int = 100) -> set[int]:
    """The study's eligibility filter: the ``k`` latents most active on each prompt
    (mean activation over its non-first tokens, in chat context) are excluded from
    steering, so the steered concept is unrelated to the task."""
    from esr_train.concepts import capture_residuals
    from esr_train.generation import render_prompt

    texts = [render_prompt(tokenizer, p) for p in prompts]
    excluded: set[int] = set()
    for acts in capture_residuals(model, tokenizer, texts, sae_layer(sae)):
        feats = sae.encode(acts.to(sae.W_dec.dtype).to(sae.W_dec.device)).mean(dim=0)
        excluded.update(torch.topk(feats, min(k, feats.numel())).indices.tolist())
    return excluded
