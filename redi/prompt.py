"""The prompt bank: pooled backbone embeddings of the normal training images (paper Sec. 3.1).

The prompt image X+ of an image X is the bank image with the highest cosine similarity to X. At
training time X is itself in the bank, so its own entry is excluded: X+ is never X.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from redi.errors import WeightsError
from redi.utils import atomic_torch_save, load_torch_file

BANK_FORMAT = "redi-prompt-bank"


@dataclass
class PromptBank:
    """L2-normalised embeddings (N, D) with the image ids they came from."""

    embeddings: torch.Tensor
    image_ids: list[str]
    backbone: str

    def __post_init__(self) -> None:
        self.embeddings = F.normalize(self.embeddings.float(), dim=1)
        if len(self.image_ids) != self.embeddings.shape[0]:
            raise ValueError("one image id per embedding is required")

    def __len__(self) -> int:
        return len(self.image_ids)

    def nearest(self, queries: torch.Tensor, exclude: torch.Tensor | None = None,
                batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-1 cosine retrieval. ``exclude[i]`` is a bank index query i may not get (or -1)."""
        return nearest_prompt(queries, self.embeddings.to(queries.device), exclude, batch_size)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_torch_save({"format": BANK_FORMAT, "embeddings": self.embeddings, "image_ids": self.image_ids,
                           "backbone": self.backbone}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, backbone: str | None = None) -> "PromptBank":
        """Load a bank; with ``backbone`` given, refuse a bank built with another one."""
        data = load_torch_file(path, "prompt bank", "build it first with `redi prompt-bank` "
                                                    "(or the build_prompt_bank stage)")
        if not isinstance(data, dict) or data.get("format") != BANK_FORMAT:
            raise WeightsError(f"{path} is not a redi prompt bank")
        if backbone and data["backbone"] != backbone:
            raise WeightsError(f"prompt bank {path} was built with backbone {data['backbone']!r}, "
                               f"but the model uses {backbone!r}; rebuild the bank")
        return cls(data["embeddings"], list(data["image_ids"]), data["backbone"])


def nearest_prompt(queries: torch.Tensor, bank: torch.Tensor, exclude: torch.Tensor | None = None,
                   batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and cosine similarities of the most similar bank rows (bank already normalised)."""
    if bank.shape[0] < 1 or (exclude is not None and bank.shape[0] < 2):
        raise ValueError("the prompt bank needs at least two images to exclude a query's own entry")
    queries = F.normalize(queries.float(), dim=1)
    indices, similarities = [], []
    for start in range(0, queries.shape[0], batch_size):
        sims = queries[start:start + batch_size] @ bank.t()
        if exclude is not None:
            rows = torch.arange(sims.shape[0], device=sims.device)
            own = exclude[start:start + batch_size].to(sims.device)
            valid = own >= 0
            sims[rows[valid], own[valid]] = float("-inf")
        best = sims.max(dim=1)
        indices.append(best.indices)
        similarities.append(best.values)
    return torch.cat(indices), torch.cat(similarities)
