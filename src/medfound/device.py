"""Where inference runs: ``--device cpu|cuda|auto`` of the inference commands (predict, segment,
sam segment, serve). Training commands choose their devices through Lightning's ``--accelerator``."""

from __future__ import annotations

import torch

from medfound.errors import InputError

CHOICES = ("auto", "cpu", "cuda")


def inference_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when there is one, else the CPU; ``cuda`` without a GPU is bad input."""
    name = str(name).lower()
    if name not in CHOICES and not name.startswith("cuda:"):
        raise InputError(None, f"--device must be cpu, cuda (cuda:N) or auto, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name}: no CUDA GPU is visible to torch on this machine (use cpu or auto)")
        _, sep, number = name.partition(":")
        index = 0 if not sep else int(number) if number.isdigit() else -1  # "cuda:" or "cuda:x": no such GPU
        if not 0 <= index < torch.cuda.device_count():
            raise InputError(None, f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


PRECISIONS = ("auto", "bf16", "32")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively (a CUDA GPU with bf16; a CPU with AMX or
    AVX512-BF16), so that bf16 autocast speeds inference up instead of emulating it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own probes (private)
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def inference_precision(name: str, device: torch.device) -> str:
    """``--precision`` of inference: ``auto`` is bf16 where the device runs it natively, else 32."""
    name = str(name).lower()
    if name not in PRECISIONS:
        raise InputError(None, f"--precision must be auto, bf16 or 32, got {name!r}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "32"
    return name
