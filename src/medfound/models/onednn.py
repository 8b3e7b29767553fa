"""Convolutions and linear layers with their GELU applied inside one oneDNN primitive, for inference
on a CPU.

On a CPU an elementwise pass over a large feature map is bound by memory, not arithmetic: TinyViT's
first stage spends as long in GELU over its 256-channel 256x256 maps as in its convolutions.
oneDNN, PyTorch's CPU backend, can apply the activation to each output tile while it is still in
cache; PyTorch exposes that as ``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise``
(the kernels its inductor compiler emits). ``torch.compile`` of the whole encoder was tried instead:
it compiled for 90 s and ran slower than eager here. So the two calls are made directly, and only
where they compute the same function: CPU tensors, no autograd (training takes the plain path), GELU
with erf as ``F.gelu``; under CPU autocast the inputs are cast as autocast would cast them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fusable(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through a fused oneDNN primitive (CPU float tensor, no autograd; in bf16
    only where the CPU has oneDNN's bf16 kernels: AVX512 or AVX-NE-CONVERT, which many AMD and older
    Intel CPUs lack, while plain autocast still runs there)."""
    if not (x.device.type == "cpu" and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()
            and x.dtype in (torch.float32, torch.bfloat16)):
        return False
    return _compute_dtype(x) != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
               padding: tuple[int, int], groups: int, act: str | None = None) -> torch.Tensor:
    """``F.conv2d`` followed by ``act`` (``"gelu"`` or ``None``)."""
    if act not in (None, "gelu"):
        raise ValueError(f"unsupported activation {act!r}")
    if not fusable(x):
        y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
        return F.gelu(y) if act else y
    dt = _compute_dtype(x)
    b = bias.to(dt) if bias is not None else None
    return torch.ops.mkldnn._convolution_pointwise(x.to(dt), weight.to(dt), b, list(padding), list(stride), [1, 1],
                                                   groups, act or "none", [None], "none" if act else None)


def linear_act(x: torch.Tensor, layer: torch.nn.Module, act: str | None = None) -> torch.Tensor:
    """``layer(x)`` followed by ``act``; fused only for a plain ``nn.Linear`` (an adapter-wrapped layer,
    such as a LoRA one, runs as itself)."""
    if act not in (None, "gelu"):
        raise ValueError(f"unsupported activation {act!r}")
    if type(layer) is not torch.nn.Linear or not fusable(x):
        y = layer(x)
        return F.gelu(y) if act else y
    dt = _compute_dtype(x)
    b = layer.bias.to(dt) if layer.bias is not None else None
    return torch.ops.mkldnn._linear_pointwise(x.to(dt), layer.weight.to(dt), b, act or "none", [None],
                                              "none" if act else None)
