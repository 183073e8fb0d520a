"""Clip-consistent augmentation for training and the test transform (spec §6.3).

Augmentation parameters are drawn once per clip and shared by all its frames,
so the motion between frames is the face's, not the augmentation's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from ..model import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE


@dataclass(frozen=True)
class AugmentParams:
    """What one clip's augmentation does, drawn once (spec §6.3)."""

    x: int
    y: int
    flip: bool
    brightness: float
    contrast: float
    saturation: float


@dataclass(frozen=True)
class ClipAugment:
    """Resize to `resize`, shared random `crop` box, flip, brightness/contrast/saturation jitter."""

    resize: int = 256
    crop: int = INPUT_SIZE
    flip: bool = True
    jitter: tuple[float, float] = (0.6, 1.4)

    def draw(self, gen: torch.Generator) -> AugmentParams:
        span = self.resize - self.crop  # offsets 0..32 inclusive for 256 -> 224
        x, y = (int(v) for v in torch.randint(0, span + 1, (2,), generator=gen))
        flip = bool(self.flip and torch.rand((), generator=gen) < 0.5)
        lo, hi = self.jitter
        b, c, s = (lo + (hi - lo) * torch.rand(3, generator=gen, dtype=torch.float64)).tolist()
        return AugmentParams(x, y, flip, b, c, s)

    def __call__(self, frames: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """frames (T, 3, H, W) uint8 -> (T, 3, crop, crop) float, normalised."""
        if frames.shape[-1] != self.resize or frames.shape[-2] != self.resize:
            frames = TF.resize(frames, [self.resize], antialias=True)
        frames = frames[..., p.y : p.y + self.crop, p.x : p.x + self.crop]
        if p.flip:
            frames = frames.flip(-1)
        return normalize(color_jitter(frames, p.brightness, p.contrast, p.saturation))


_GRAY = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)  # torchvision's rgb_to_grayscale weights


def color_jitter(frames: torch.Tensor, brightness: float, contrast: float, saturation: float) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float in [0, 1]: brightness, then contrast, then saturation.

    The same arithmetic as torchvision's adjust_brightness/contrast/saturation on
    float images (blend with black, the grey mean, the grey image; clamp after each),
    done in place because those functions are several times slower on a busy CPU.
    """
    x = frames.float().mul_(brightness / 255.0).clamp_(0, 1)
    mean = (x * _GRAY).sum(1, keepdim=True).mean((2, 3), keepdim=True)  # (T, 1, 1, 1)
    x.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 1)
    gray = (x * _GRAY).sum(1, keepdim=True)  # (T, 1, H, W)
    return x.mul_(saturation).add_(gray.mul_(1 - saturation)).clamp_(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation, in place on a float tensor (T, 3, H, W) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def test_transform(images: list[np.ndarray]) -> torch.Tensor:
    """Aligned RGB faces -> (T, 3, 224, 224): the whole face resized, no crop (spec §6.3).

    The very function `aucli detect` prepares faces with, so both see identical input.
    """
    from ..faces import face_to_tensor

    return face_to_tensor(np.stack(images))


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 images (H, W, 3) -> (T, 3, H, W) uint8."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
