"""The MDHR network (Wang et al., CVPR 2024) as plain nn.Modules."""

from .mdhr import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, MDHR, FrameCodes

__all__ = ["MDHR", "FrameCodes", "INPUT_SIZE", "IMAGENET_MEAN", "IMAGENET_STD"]
