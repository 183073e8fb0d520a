"""The model as ``detect`` runs it: the same MDHR, arranged for speed.

* BatchNorm folded into the convolution before it (backbone and MFD's
  projections): the same function with one operation fewer per layer.
* Channels-last memory layout for the convolutions.
* On the CPU, each ResNet convolution followed by a ReLU runs as one oneDNN
  call with the ReLU fused (``_ResNetFused``): the same numbers to the bit
  (ReLU commutes with rounding), one pass over the activations fewer. Each
  block's last convolution also adds the shortcut, in place: the same bits in
  fp32; in bf16 the sum is rounded once instead of twice. Each
  convolution's weight is reordered into oneDNN's layout once, not per call.
* ``--precision bf16``: the backbone, MFD's projections and fusing
  convolution, and HSR's linear layers (nearly all the arithmetic) compute in
  bfloat16; their outputs return to float32, and the rest of the temporal head
  (static path, MFD pooling and weighting, graph attention, TCN, classifier)
  stays in float32. ``fp32`` keeps everything in float32.
* In the temporal head, BatchNorms are folded into the layers before them,
  HSR's per-AU extractors of one region run as one matrix product, and MFD's
  temporal pooling is a running sum (``InferenceModel.predict_window``): the
  same function to float rounding. For a 78-frame window of the starter model
  on the 2-core Intel Xeon (AMX): 147 ms as the plain model, 134 ms in fp32,
  65 ms in bf16.
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
from .model.blocks import LinearBlock
from .model.hsr import HSR
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
        self._hsr = _StackedHSR(model.hsr, self.dtype)
        # MFD's fusing 1x1 convolution with its BatchNorm folded in.
        mfd = model.mfd
        scale = mfd.fuse_bn.weight * torch.rsqrt(mfd.fuse_bn.running_var + mfd.fuse_bn.eps)
        self._fuse_weight = (mfd.fuse_conv.weight * scale.view(-1, 1, 1, 1)).detach()
        self._fuse_weight = self._fuse_weight.to(self.dtype, memory_format=torch.channels_last)
        self._fuse_bias = ((mfd.fuse_conv.bias - mfd.fuse_bn.running_mean) * scale + mfd.fuse_bn.bias).detach()
        self._fuse_bias = self._fuse_bias.to(self.dtype)

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
        """Maps of P frames and of their successors -> projected differences (P, 4, C, 7, 7),
        in the compute dtype: they are kept until their windows run, and ``predict_window``
        takes them to float32 (exactly: they were computed in that dtype), so bf16 halves
        the bytes held and copied per frame pair.

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
            out.append(y.view(P, H // k, W // k, -1).permute(0, 3, 1, 2))
        return torch.stack(out, dim=1)

    def predict_window(self, static: torch.Tensor, motion: torch.Tensor):
        """The temporal head: see ``MDHR.predict_window``. Float32, except HSR's linear layers
        (``_StackedHSR``), which compute in the chosen precision."""
        m = self.model
        B, T = static.shape[:2]
        g = static.flatten(0, 1) + self._mfd(motion)  # (BT, 49, d)
        nodes, aux = self._hsr(g)
        probs = m.classifier(m.temporal(nodes.view(B, T, *nodes.shape[1:]))).view(B, T, -1)
        return probs, {name: logits.view(B, T, -1) for name, logits in zip(m.au_set.branch_names, aux)}

    def _mfd(self, motion: torch.Tensor) -> torch.Tensor:
        """``MFD.forward``: motion (B, T-1, 4, C, 7, 7) -> X_dyn (B*T, 49, d) float32.

        The temporal pooling (windows of 2k differences, zero padding, divisor 2k, spec §2.3)
        as a running sum, one difference in and one out per frame, instead of 2k shifted
        additions (the same sums up to float rounding; 24 -> 7 ms for a 78-frame window of
        ResNet-18 maps), and the fusing convolution with its BatchNorm folded, in the
        compute dtype. Each scale is pooled on its own into a contiguous float32 map, straight
        from the compute dtype (no widened copy of the whole window first), and the weighted sum
        is formed in place: the same values to the bit as pooling all scales at once, 35 % less
        time for a 78-frame window (ResNet-50 maps: ~265 -> ~170 ms on the 2-core Intel Xeon).
        """
        mfd, k = self.model.mfd, self.k
        B, P = motion.shape[:2]
        T = P + 1
        size = motion.shape[3:].numel()  # C * 7 * 7
        pooled = []
        for scale in motion.unbind(2):  # per scale, so that each pooled map is contiguous
            x = scale.reshape(B, P, size)  # a view, in the compute dtype: added into float32 exactly
            out = x.new_empty(B, T, size, dtype=torch.float32)
            running = x[:, :k].sum(1, dtype=torch.float32)  # frame t pools differences t-k .. t+k-1 that exist
            out[:, 0] = running
            for t in range(1, T):
                if t + k - 1 < P:
                    running += x[:, t + k - 1]
                if t - k - 1 >= 0:
                    running -= x[:, t - k - 1]
                out[:, t] = running
            pooled.append(out.div_(2 * k).view(B * T, *motion.shape[3:]))  # (BT, C, 7, 7)
        gates = torch.cat([s.gate(p) for s, p in zip(mfd.scales, pooled)], dim=1)
        weights = torch.softmax(mfd.gate_mix(gates), dim=1)  # (BT, 4, 7, 7), softmax over scales
        fused = weights[:, :1] * pooled[0]  # (BT, C, 7, 7); the sum in place, in the same order
        for i in range(1, 4):
            fused += weights[:, i : i + 1] * pooled[i]
        # As a 1x1 convolution in channels-last layout its output is already (BT, 7, 7, d) in memory.
        fused = fused.to(self.dtype, memory_format=torch.channels_last)
        x = torch.relu(F.conv2d(fused, self._fuse_weight, self._fuse_bias))  # (BT, d, 7, 7)
        return x.permute(0, 2, 3, 1).flatten(1, 2).float()  # (BT, 49, d)


def _folded_linear(block: LinearBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """A LinearBlock's Linear with its (eval-mode) BatchNorm folded in: weight (out, in), bias (out,)."""
    bn = block.bn
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = block.fc.weight * scale[:, None]
    bias = (block.fc.bias - bn.running_mean) * scale + bn.bias
    return weight.detach(), bias.detach()


class _StackedHSR:
    """HSR's forward (aucli/model/hsr.py) arranged for inference.

    Every LinearBlock has its BatchNorm folded into the Linear, and the per-AU
    extractors of one branch, which all read the same region tokens, run as one
    matrix product (M*21, d) x (d, n_AUs*d) instead of one product per AU. In
    HSR these products are nearly all the arithmetic (about 230 MFLOP per frame
    for d = 512, 17 AUs): they compute in ``dtype`` (bfloat16 with --precision
    bf16), their outputs return to float32 before the mean over the region's
    tokens, and the rest (auxiliary heads, activation mask, graph attention)
    stays float32.
    """

    def __init__(self, hsr: HSR, dtype: torch.dtype) -> None:
        self.hsr, self.dtype = hsr, dtype
        au_set = hsr.au_set
        self.region_blocks = None
        if au_set.branch_blocks:
            self.region_blocks = {n: self._cast(*_folded_linear(hsr.region_blocks[n])) for n in au_set.branch_names}
        self.branches = []  # (AU indices, stacked weight (n*d, d), bias (n*d,)) per branch
        for b in range(len(au_set.branches)):
            aus = [n for n, branch in enumerate(au_set.branch_index) if int(branch) == b]
            parts = [_folded_linear(hsr.au_extractors[n]) for n in aus]
            weight, bias = torch.cat([w for w, _ in parts]), torch.cat([c for _, c in parts])
            self.branches.append((aus, *self._cast(weight, bias)))
        self.order = torch.tensor([n for aus, _, _ in self.branches for n in aus]).argsort()

    def _cast(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight.to(self.dtype).contiguous(), bias.to(self.dtype)

    def _linear_relu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.linear(x.to(self.dtype), weight, bias))

    def __call__(self, g: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """G (M, 49, d) float32 -> AU node features (M, N, d) and aux logits per branch, float32."""
        hsr = self.hsr
        M, _, d = g.shape
        grid = g.view(M, 7, 7, d)
        regions = []
        for b in hsr.au_set.branches:
            tokens = grid[:, b.rows[0] : b.rows[1]].flatten(1, 2)  # (M, L, d)
            if self.region_blocks is not None:
                tokens = self._linear_relu(tokens, *self.region_blocks[b.name])
            regions.append(tokens)
        aux = [hsr.aux_heads[b.name](r.float().mean(1)) for b, r in zip(hsr.au_set.branches, regions)]
        nodes = torch.cat(
            [self._linear_relu(regions[b], w, c).float().mean(1).view(M, len(aus), d)
             for b, (aus, w, c) in enumerate(self.branches)],
            dim=1,
        )[:, self.order]  # (M, N, d) in AU order
        mask = hsr.activation_mask(aux)
        eye = torch.eye(hsr.au_set.num_aus, dtype=nodes.dtype, device=nodes.device)
        adjacency = hsr.adjacency.to(nodes.dtype) * mask.unsqueeze(1) + eye
        return hsr.gat(nodes, adjacency), aux


class _ResNetFused:
    """The backbone's ResNet forward (aucli/model/backbone.py) with every convolution that a
    ReLU follows run as oneDNN's convolution with the ReLU fused. BatchNorm must be folded
    already (``fold_batchnorm``): the ``bn`` modules are identities.

    Each block's last convolution also adds the shortcut and applies the ReLU, writing into
    the shortcut's memory (oneDNN's in-place "sum" post-op, the way torch.compile's inductor
    runs a ResNet on CPU). In fp32 that is the same sequence of float operations as the
    separate addition, so the same bits. In bf16 the sum is rounded once instead of twice
    (convolution, then addition), which moves a quarter to a half of the map values by a
    bf16 step or two (docs/speed.md). On the 2-core Intel Xeon (AMX), batch 16, medians of
    paired rounds: the ResNet-50 backbone 1.13-1.26x and ResNet-18 1.09x as fast in bf16,
    1.07x and 1.04x in fp32. The out-of-place "add" post-op, measured there before, had
    gained 0.7 % and 2.2 %.
    """

    def __init__(self, resnet: nn.Module) -> None:
        if any(isinstance(module, nn.BatchNorm2d) for module in resnet.modules()):
            raise ValueError("fold BatchNorm into the convolutions first")
        self.resnet = resnet
        self._weights: dict[nn.Conv2d, torch.Tensor] = {}  # each convolution's weight as oneDNN keeps it
        # A torch without the in-place op keeps the residual addition as a step of its own.
        self._sum_in_place = hasattr(torch.ops.mkldnn, "_convolution_pointwise_")

    @staticmethod
    def available(device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
        )

    def _weight(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        weight = self._weights.get(conv)
        if weight is None:
            weight = self._weights[conv] = self._prepack(conv, x)
        return weight

    def _conv(self, conv: nn.Conv2d, x: torch.Tensor, relu: bool) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._weight(conv, x), conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups,
            "relu" if relu else "none", [], "",
        )

    @staticmethod
    def _prepack(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        """The convolution's weight reordered once into the blocked layout oneDNN's kernel takes for
        inputs like ``x`` (given a plain weight, it reorders it on every call). The outputs are the
        same to the bit, for this and any other batch size (tests/test_inference.py); the ResNet-18
        and ResNet-50 backbones measured 1.04 and 1.06 x as fast in bf16 on the 2-core Intel Xeon
        (medians of 20 paired rounds). The plain weight is dropped: the module's convolution no
        longer runs on its own. Where torch lacks the reorder, the plain weight serves."""
        reorder = getattr(torch.ops.mkldnn, "_reorder_convolution_weight", None)
        if reorder is None:
            return conv.weight
        packed = reorder(conv.weight.detach(), conv.padding, conv.stride, conv.dilation, conv.groups, list(x.shape))
        conv.weight = None
        return packed

    def _block(self, block: nn.Module, x: torch.Tensor, overwrite: bool) -> torch.Tensor:
        """One residual block. ``overwrite``: the block's output may take the memory of ``x``
        (which is then lost); else a block without a downsampling shortcut copies it first."""
        if block.downsample is not None:
            shortcut = self._conv(block.downsample[0], x, relu=False)
        else:
            shortcut = x if overwrite else x.clone()
        if isinstance(block, Bottleneck):
            x = self._conv(block.conv2, self._conv(block.conv1, x, relu=True), relu=True)
            last = block.conv3
        else:
            assert isinstance(block, BasicBlock)
            x = self._conv(block.conv1, x, relu=True)
            last = block.conv2
        if not self._sum_in_place:
            x = self._conv(last, x, relu=False)
            x += shortcut
            return torch.relu_(x)
        torch.ops.mkldnn._convolution_pointwise_.binary(  # shortcut += conv(x); relu, in place
            shortcut, x, self._weight(last, x), last.bias, last.padding, last.stride, last.dilation,
            last.groups, "add", 1.0, "relu", [], "",
        )
        return shortcut

    def __call__(self, x: torch.Tensor) -> BackboneOutput:
        m = self.resnet
        x = m.maxpool(self._conv(m.conv1, x, relu=True))
        maps = []
        for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
            for i, block in enumerate(layer):
                # A layer's first block reads the map the layer before returns: keep that map.
                x = self._block(block, x, overwrite=not (maps and i == 0))
            maps.append(x)
        return BackboneOutput(maps[-1].flatten(2).transpose(1, 2), maps)
