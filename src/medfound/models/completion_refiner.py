"""The completion refiner: corrects an interpolated outline where the study's image says otherwise.

Between two labelled slices of a study, shape-based interpolation morphs one outline into the next
without looking at the image. The refiner sees the slice to complete, the two labelled slices around
it with their masks, and the interpolated outline (``data.completion_inputs.CHANNELS``), and returns a
correction to the outline's logits. The correction starts at exactly zero (its last layer is zeroed),
so an untrained refiner is the interpolation itself, and training only has to learn where the image
moves the outline. A small 2D U-Net (MONAI's ``BasicUNet``) on a window resized around the structure.

``load_refiner(None)`` loads the refiner that ships inside the package (``medfound/weights/completion``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from monai.networks.nets import BasicUNet

from medfound.data.completion_inputs import CHANNELS
from medfound.models.run_folder import load_run, save_run

DEFAULT_REFINER_DIR = Path(__file__).resolve().parent.parent / "weights" / "completion"
KIND = "completion-refiner"


@dataclass
class RefinerConfig:
    size: int = 96                                       # the window's side after resizing (px)
    features: tuple[int, ...] = (16, 32, 48, 64, 96, 16)  # BasicUNet: five levels and the last block

    def as_dict(self) -> dict:
        return asdict(self) | {"features": list(self.features)}

    @classmethod
    def from_dict(cls, d: dict) -> "RefinerConfig":
        return cls(size=int(d.get("size", 96)), features=tuple(int(f) for f in d.get("features", cls.features)))


class CompletionRefiner(nn.Module):
    """(B, 8, S, S) inputs -> (B, S, S) logits: the interpolated outline's logits plus a learned correction."""

    def __init__(self, config: RefinerConfig | None = None):
        super().__init__()
        self.config = config or RefinerConfig()
        self.unet = BasicUNet(spatial_dims=2, in_channels=len(CHANNELS), out_channels=1,
                              features=self.config.features)
        nn.init.zeros_(self.unet.final_conv.weight)  # a fresh refiner returns the interpolation unchanged
        nn.init.zeros_(self.unet.final_conv.bias)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 8, S, S) -> (B, S, S): what to add to the interpolated outline's logits."""
        return self.unet(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return prior_logits(x[:, CHANNELS.index("prior")]) + self.correction(x)


def prior_logits(prob: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Logits of the interpolated outline's probability (clipped so that 0 and 1 stay finite)."""
    p = prob.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


def save_refiner(model: CompletionRefiner, run: str | os.PathLike, config: dict) -> Path:
    return save_run(model, run, KIND, {"model": model.config.as_dict(), **config})


def load_refiner(run: str | os.PathLike | None = None) -> tuple[CompletionRefiner, dict]:
    """Rebuild and load a completion refiner; ``None`` = the packaged one."""
    return load_run(Path(run) if run is not None else DEFAULT_REFINER_DIR, KIND,
                    lambda c: CompletionRefiner(RefinerConfig.from_dict(c.get("model", {}))),
                    DEFAULT_REFINER_DIR, "completion refiner", "medfound incontext train-completion")
