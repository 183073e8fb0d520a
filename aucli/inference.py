"""The model as ``detect`` runs it: the same MDHR, arranged for speed.

* BatchNorm folded into the convolution before it (backbone and MFD's
  projections): the same function with one operation fewer per layer.
* Channels-last memory layout for the convolutions.
* On the CPU, each ResNet convolution followed by a ReLU runs as one oneDNN
  call with the ReLU fused (``_ResNetFused``): the same numbers to the bit
  (ReLU commutes with rounding), one pass over the activations fewer.
* ``--precision bf16``: the backbone and MFD's projections (nearly all the
  arithmetic) compute in bfloat16; their outputs return to float32, and the
  temporal head (static path, MFD pooling and fusion, HSR, TCN, classifier)
  stays in float32. ``fp32`` keeps everything in float32.
* ``auto`` takes bf16 where the hardware has native bf16 arithmetic (a CUDA
  GPU that supports it; a CPU that reports avx512_bf16 or amx_bf16) and fp32
  elsewhere, where bf16 would be emulated and slower.

The staged interface is the model's own (``encode_frames``, ``encode_motion``,
``predict_window``), so aucli/windows.py drives either. Training and the
reference-parity tests use the plain model.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .model import MDHR, FrameCodes
from .model.backbone import BackboneOutput
from .model.resnet import BasicBlock, Bottleneck

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# CPU flags (Linux /proc/cpuinfo) of native bf16 dot products: AVX-512 BF16 (Intel Cooper
# Lake and later, AMD Zen 4 and later) and AMX (Intel Sapphire Rapids and later).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where the CPU reports bf16 dot-product instructions that torch's kernels use."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # untested elsewhere: stay on fp32
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> the fastest precision this device runs well; "fp32"/"bf16" pass through."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, in place (eval mode).

    The pairs are the ones the forward passes apply back to back: ``convN``
    then ``bnN`` in timm's ResNets (stem and blocks), ``conv`` then ``bn`` in
    MFD's projections, and a Conv2d followed by a BatchNorm2d inside an
    ``nn.Sequential`` (ResNet downsampling). Each folded BatchNorm becomes an
    ``nn.Identity``.
    """
    for parent in module.modules():
        names = list(parent._modules)
        if isinstance(parent, nn.Sequential):
            pairs = list(zip(names, names[1:]))
        else:
            pairs = [(n, "bn" + n[len("conv"):]) for n in names if n.startswith("conv")]
        for conv_name, bn_name in pairs:
            conv, bn = parent._modules.get(conv_name), parent._modules.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold(conv, bn)
                parent._modules[bn_name] = nn.Identity()
    return module


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))  # in place: no second copy of the big weights
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)


class InferenceModel:
    """MDHR's three stages for sliding-window inference, at a chosen precision.

    Takes over ``model`` (its backbone and MFD projections are rearranged in
    place; the model stays usable through this object, not on its own).
    """

    def __init__(self, model: MDHR, precision: str = "fp32") -> None:
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
        model.eval()
        self.model = model
        self.k = model.k
        self.precision = precision
        self.dtype = DTYPES[precision]
        # Swin's convolutions are one patch embedding; only ResNets gain from these two.
        self.channels_last = model.backbone.family == "resnet"
        fold_batchnorm(model.backbone)
        for scale in model.mfd.scales:
            fold_batchnorm(scale)  # project() is relu(bn(conv(diff))): the relu stays
        # MFD's projection weights as matrices over (kh, kw, C) patches, for encode_motion.
        self._patch_weights = [
            s.conv.weight.detach().permute(0, 2, 3, 1).reshape(s.conv.out_channels, -1).to(self.dtype).contiguous()
            for s in model.mfd.scales
        ]
        for scale in model.mfd.scales:
            scale.conv.weight = None  # held once, as the matrix above
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        for part in [model.backbone, *(scale.conv for scale in model.mfd.scales)]:
            for param in part.parameters():  # one copy per tensor for both changes
                param.data = param.data.to(self.dtype, memory_format=layout if param.dim() == 4 else torch.preserve_format)

        self._backbone = model.backbone
        if self.channels_last and _ResNetFused.available(self.device):
            self._backbone = _ResNetFused(model.backbone.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def encode_frames(self, frames: torch.Tensor) -> FrameCodes:
        """frames (M, 3, 224, 224) float32 -> static tokens (float32) and maps (compute dtype)."""
        out = self._backbone(self._layout(frames))
        static = self.model.static_proj(out.tokens.float())
        return FrameCodes(static, out.maps)

    def encode_motion(self, prev_maps: list[torch.Tensor], next_maps: list[torch.Tensor]) -> torch.Tensor:
        """Maps of P frames and of their successors -> projected differences (P, 4, C, 7, 7), float32.

        MFD's projections have kernel = stride (8, 4, 2, 1), so each is one matrix
        product of non-overlapping patches: computed that way (measured ~25 % faster
        than the convolution in bf16 on CPU), with the ReLU of ``ScaleProjection.project``.
        """
        out = []
        for scale, a, b, weight in zip(self.model.mfd.scales, prev_maps, next_maps, self._patch_weights):
            conv = scale.conv
            diff = self._layout(b - a)
            P, C, H, W = diff.shape
            k = conv.kernel_size[0]
            patches = diff.permute(0, 2, 3, 1).reshape(P, H // k, k, W // k, k, C)
            patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(P * (H // k) * (W // k), k * k * C)
            y = torch.relu(F.linear(patches, weight, conv.bias))  # (P * 49, C_out)
            out.append(y.float().view(P, H // k, W // k, -1).permute(0, 3, 1, 2))
        return torch.stack(out, dim=1)

    def predict_window(self, static: torch.Tensor, motion: torch.Tensor):
        """The temporal head, in float32: see ``MDHR.predict_window``."""
        return self.model.predict_window(static, motion)


class _ResNetFused:
    """The backbone's ResNet forward (aucli/model/backbone.py) with every convolution that a
    ReLU follows run as oneDNN's convolution with the ReLU fused. BatchNorm must be folded
    already (``fold_batchnorm``): the ``bn`` modules are identities.

    The residual addition stays a separate step: fusing it too (oneDNN's "add" post-op)
    measured another ~13 % on the bf16 backbone but rounds the sum once instead of twice,
    so bf16 results would move by one bf16 step; in fp32 it changed nothing and gained ~2 %.
    """

    def __init__(self, resnet: nn.Module) -> None:
        if any(isinstance(module, nn.BatchNorm2d) for module in resnet.modules()):
            raise ValueError("fold BatchNorm into the convolutions first")
        self.resnet = resnet

    @staticmethod
    def available(device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        )

    @staticmethod
    def _conv(conv: nn.Conv2d, x: torch.Tensor, relu: bool) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
            "relu" if relu else "none", [], "",
        )

    def _block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if block.downsample is None else self._conv(block.downsample[0], x, relu=False)
        if isinstance(block, Bottleneck):
            x = self._conv(block.conv2, self._conv(block.conv1, x, relu=True), relu=True)
            x = self._conv(block.conv3, x, relu=False)
        else:
            assert isinstance(block, BasicBlock)
            x = self._conv(block.conv2, self._conv(block.conv1, x, relu=True), relu=False)
        x += shortcut
        return torch.relu_(x)

    def __call__(self, x: torch.Tensor) -> BackboneOutput:
        m = self.resnet
        x = m.maxpool(self._conv(m.conv1, x, relu=True))
        maps = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for block in layer:
                x = self._block(block, x)
            maps.append(x)
        return BackboneOutput(maps[-1].flatten(2).transpose(1, 2), maps)
