"""Clips for training and testing (spec §7.3, §7.4).

Training: one random T-frame window per video per epoch. Every random choice
(window start, augmentation) is derived from (seed, epoch), never from worker
state, so an epoch is the same whatever the number of workers or processes,
and a resumed run replays exactly what an uninterrupted one would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .layout import PADDING, Split
from .transforms import ClipAugment, test_transform, to_tensor


def read_image(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def pad_window(frames: range | list[int], length: int) -> tuple[list[int], list[bool]]:
    """Frame indices of a clip padded to `length` by repeating the last frame, and which are real."""
    frames = list(frames)[:length]
    real = [True] * len(frames) + [False] * (length - len(frames))
    return frames + [frames[-1]] * (length - len(frames)), real


@dataclass(frozen=True)
class ClipRequest:
    """One training item: a window of a video and the seed of its augmentation."""

    video: int
    start: int
    seed: int


class TrainClips(Dataset):
    """Items are ClipRequests from VideoClipSampler; returns frames, labels, sub-labels."""

    def __init__(self, split: Split, clip_length: int, augment: ClipAugment | None = None) -> None:
        self.split = split
        self.clip_length = clip_length
        self.videos = split.videos()  # spec §7.3: cut at subject/task (BP4D) or subject (DISFA)
        self.augment = augment or ClipAugment()

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, req: ClipRequest) -> dict[str, torch.Tensor]:
        video = self.videos[req.video]
        index, real = pad_window(video[req.start : req.start + self.clip_length], self.clip_length)
        frames = to_tensor([read_image(self.split.image_path(i)) for i in index])
        gen = torch.Generator().manual_seed(req.seed)
        clips = self.augment(frames, self.augment.draw(gen))
        return _item(self.split, index, real, clips)


class VideoClipSampler(Sampler[ClipRequest]):
    """Random windows per video per epoch (one, as the reference; or ``clips_per_video``), shuffled,
    sharded over processes like DistributedSampler."""

    def __init__(self, video_lengths: list[int], clip_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, clips_per_video: int = 1) -> None:
        self.lengths = list(video_lengths)
        self.clip_length = clip_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.clips_per_video = clips_per_video
        self.epoch = 0
        self.per_rank = math.ceil(len(self.lengths) * clips_per_video / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def requests(self) -> list[ClipRequest]:
        """All requests of this epoch for every rank, in order (rank r takes r, r + W, ...)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        count = len(self.lengths) * self.clips_per_video
        # With one clip per video this is the permutation of the videos, as before.
        order = [i % len(self.lengths) for i in torch.randperm(count, generator=gen).tolist()]
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=gen).tolist()
        out = []
        for video, seed in zip(order, seeds):
            # Start uniform over 0..len-T inclusive (spec §7.3); short videos start at 0 and are padded.
            last = max(self.lengths[video] - self.clip_length, 0)
            start = int(torch.randint(0, last + 1, (1,), generator=gen))
            out.append(ClipRequest(video, start, seed))
        # Like DistributedSampler: repeat from the start so every rank gets the same count.
        total = self.per_rank * self.world_size
        return (out * math.ceil(total / max(len(out), 1)))[:total]

    def __iter__(self) -> Iterator[ClipRequest]:
        return iter(self.requests()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return self.per_rank


def eval_clip_windows(split: Split, clip_length: int) -> list[tuple[list[int], list[bool]]]:
    """Consecutive, non-overlapping clips that never span two videos, padded at each video end (§7.4)."""
    windows = []
    for video in split.videos(split_on_gap=split.fmt.split_on_gap):
        for start in range(video.start, video.stop, clip_length):
            windows.append(pad_window(range(start, min(start + clip_length, video.stop)), clip_length))
    return windows


class EvalClips(Dataset):
    """Test clips in list order; padded frames carry label -1 and a copy of the last sub-label."""

    def __init__(self, split: Split, clip_length: int, windows: list | None = None) -> None:
        self.split = split
        self.windows = eval_clip_windows(split, clip_length) if windows is None else windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index, real = self.windows[i]
        frames = test_transform([read_image(self.split.image_path(j)) for j in index])
        return _item(self.split, index, real, frames)


def _item(split: Split, index: list[int], real: list[bool], clips: torch.Tensor) -> dict[str, torch.Tensor]:
    real_t = torch.tensor(real)
    labels = torch.from_numpy(split.labels[index])  # (T, N)
    labels[~real_t] = PADDING
    return {
        "clips": clips,  # (T, 3, 224, 224)
        "labels": labels,
        "sub_labels": torch.from_numpy(split.sub_labels[index]),  # padding copies the last frame's (§7.4)
        "frames": torch.tensor(index),
        "real": real_t,
    }
