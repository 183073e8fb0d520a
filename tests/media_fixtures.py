"""Shared helpers for the detect tests: sample media, synthetic videos, a tiny checkpoint."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT / "sample_videos" / "videos"
IMAGES = ROOT / "sample_videos" / "images"

# Frames each sample presents. no_face.mp4 stores 98 frames but its MP4 edit
# list starts 3 frames in, so FFmpeg (and any player) presents 95.
SAMPLE_FRAMES = {
    "WolfgangLanger_Pexels.mp4": 472,
    "single_face.mp4": 72,
    "face_noface.mov": 169,
    "no_face.mp4": 95,
}


def make_video(
    path: Path,
    codec: str = "libx264",
    pts_ms: list[int] | None = None,
    size: tuple[int, int] = (64, 48),
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    frames: list[np.ndarray] | None = None,
) -> Path:
    """Encode a small video; frame i is a flat grey i*20 (or ``frames[i]``), at ``pts_ms[i]`` ms."""
    pts_ms = pts_ms if pts_ms is not None else [i * 40 for i in range(len(frames) if frames else 10)]
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i, pts in enumerate(pts_ms):
            image = frames[i] if frames else np.full((size[1], size[0], 3), (i * 20) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def tiny_model(clip_length: int = 12, k: int = 2, seed: int = 0):
    """A randomly initialised MDHR with a small backbone, BN statistics randomised
    so that any mix-up of frames or positions shows in the outputs."""
    from aucli.model import MDHR

    torch.manual_seed(seed)
    model = MDHR("bp4d", backbone="resnet_tiny", k=k, feature_dim=64)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.rand(module.running_mean.shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model.eval()


def tiny_checkpoint(path: Path, clip_length: int = 12, k: int = 2, seed: int = 0) -> Path:
    from aucli.checkpoint import save_checkpoint

    save_checkpoint(path, tiny_model(clip_length, k, seed), clip_length=clip_length, source={"kind": "random"})
    return path


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run torch on one thread in these tests: the test machine's two cores are
    shared, and two intra-op threads competing with another process ran ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_audio(path: Path) -> Path:
    """An audio-only file: one second of silence."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return path
