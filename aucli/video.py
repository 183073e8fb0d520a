"""Streaming decode with real timestamps, image sequences, and input discovery.

A frame travels out of here as a ``Frame``: its 0-based decode index, its
timestamp from the container's presentation time stamp (so variable frame rate
comes out right), and an RGB image with the display rotation already applied.
Frames are decoded one at a time; nothing here holds the whole video.
"""

from __future__ import annotations

import glob
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import AucliError

# Extensions a folder is searched for. An explicitly named file is opened
# whatever its extension, since FFmpeg reads far more than this list.
VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .mkv .webm .avi .mpg .mpeg .ts .mts .m2ts .wmv .flv .3gp .ogv .mxf .gif".split()
)
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .tif .tiff .webp".split())
DEFAULT_FPS = 30.0


@dataclass
class Frame:
    """One decoded frame."""

    index: int  # 0-based position in decode (presentation) order
    timestamp: float  # seconds from the stream start, from the PTS
    image: np.ndarray  # (H, W, 3) uint8 RGB, display rotation applied


@dataclass
class VideoInfo:
    """What the container says about a video (or an image sequence)."""

    path: str
    kind: str  # "video" or "images"
    width: int  # after rotation
    height: int
    fps: float  # nominal rate; timestamps come from the PTS, not from this
    frame_count: int | None  # frames the container promises; None when it does not say
    duration: float | None  # seconds
    rotation: int  # degrees counter-clockwise applied to the decoded picture
    codec: str

    def to_dict(self) -> dict:
        return asdict(self)


class _Reader:
    """Shared bookkeeping of both readers: info, decode count and warnings."""

    def __init__(self, info: VideoInfo) -> None:
        self.info = info
        self.decoded = 0  # frames handed out so far
        self.warnings: list[str] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class VideoReader(_Reader):
    """A video file decoded frame by frame with PyAV.

    Opening decodes the first frame, so a file that cannot produce a single
    picture fails here with a one-line ``AucliError`` rather than mid-run.
    """

    def __init__(self, path: str | Path) -> None:
        import av  # heavy; keep `aucli --help` fast

        self.path = Path(path)
        name = str(path)
        if not self.path.exists():
            raise AucliError(f"{name}: no such file or directory")
        if self.path.is_dir():
            raise AucliError(f"{name}: is a directory, not a video")
        if self.path.stat().st_size == 0:
            raise AucliError(f"{name}: empty file")
        try:
            self._container = av.open(name)
        except av.FFmpegError as error:
            raise AucliError(f"{name}: not a readable video ({_reason(error)})") from None
        if not self._container.streams.video:
            self._container.close()
            raise AucliError(f"{name}: no video stream (audio-only or not a video)")
        # The first video stream, wherever it sits: some files put audio first.
        self._stream = stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._break: str | None = None  # FFmpeg's reason when decoding stopped on an error
        self._frames = self._decode()
        self._first = next(self._frames, None)
        if self._first is None:
            self._container.close()
            raise AucliError(f"{name}: no frame could be decoded")

        fps = float(stream.average_rate or stream.guessed_rate or 0) or DEFAULT_FPS
        duration = None
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif self._container.duration:
            duration = self._container.duration / 1_000_000
        height, width = self._first.image.shape[:2]
        super().__init__(
            VideoInfo(
                path=name,
                kind="video",
                width=width,
                height=height,
                fps=fps,
                frame_count=stream.frames or None,
                duration=duration,
                rotation=self._rotation,
                codec=stream.codec_context.name,
            )
        )

    def _decode(self) -> Iterator[Frame]:
        import av

        stream = self._stream
        base = stream.time_base
        start = stream.start_time
        self._rotation = 0
        to_rgb = _rgb_converter()
        step = 1.0 / float(stream.average_rate or DEFAULT_FPS)
        index, previous = 0, None
        try:
            for frame in self._container.decode(stream):
                if frame.pts is None:  # raw streams without timing: fall back on the nominal rate
                    timestamp = 0.0 if previous is None else previous + step
                else:
                    if start is None:
                        start = frame.pts
                    timestamp = float((frame.pts - start) * base)
                if index == 0:
                    self._rotation = int(round(getattr(frame, "rotation", 0) or 0)) % 360
                yield Frame(index, timestamp, _rotate(to_rgb(frame), self._rotation))
                index, previous = index + 1, timestamp
        except av.FFmpegError as error:
            # Keep what decoded; the caller learns about the break from warnings.
            self._break = _reason(error)

    def __iter__(self) -> Iterator[Frame]:
        if self._first is not None:
            first, self._first = self._first, None
            self.decoded += 1
            yield first
        last = 0.0
        for frame in self._frames:
            self.decoded += 1
            last = frame.timestamp
            yield frame
        self._check_complete(last)
        self.close()

    def _check_complete(self, last_timestamp: float) -> None:
        """Warn when the video broke off before the end the container promised.

        The promised frame count alone is not enough: an MP4 edit list can hide
        frames (``no_face.mp4`` stores 98 and presents 95), so a short count only
        counts as a break when the decoded frames also end well before the
        stream's stated duration.
        """
        info = self.info
        promised = info.frame_count or (
            round(info.duration * info.fps) if info.duration else None
        )
        ends_early = info.duration is None or last_timestamp + 1.5 / info.fps < info.duration
        if self._break or (promised and self.decoded < promised and ends_early):
            why = f" ({self._break})" if self._break else ""
            expected = f"the container promised {promised}" if promised else "the stream ended early"
            self.warnings.append(
                f"{info.path}: video breaks off after {self.decoded} frames{why}; {expected}"
            )

    def close(self) -> None:
        self._container.close()


def _rgb_converter():
    """frame -> (H, W, 3) uint8 RGB, the same pixels as ``frame.to_ndarray(format="rgb24")``.

    That call builds a new swscale context per frame, and recent FFmpeg gives each
    one its own threads: two threads started and stopped per frame. One converter
    for the whole video on the calling thread gives identical arrays; decoding
    WolfgangLanger_Pexels.mp4 took 0.3 s instead of 2.4 s while another process
    kept the CPUs busy (0.44 s instead of 1.1 s on face_noface.mov).
    """
    from av.video.reformatter import VideoReformatter

    reformatter = VideoReformatter()
    options = {"format": "rgb24", "threads": 1}

    def convert(frame) -> np.ndarray:
        nonlocal options
        try:
            return reformatter.reformat(frame, **options).to_ndarray()
        except TypeError:
            if "threads" not in options:
                raise
            options = {"format": "rgb24"}  # a PyAV without ``threads``: FFmpeg's default
            return reformatter.reformat(frame, **options).to_ndarray()

    return convert


class ImageSequenceReader(_Reader):
    """A folder of numbered images (or one image) read as a video at ``fps``."""

    def __init__(self, path: str | Path, fps: float = DEFAULT_FPS) -> None:
        self.path = Path(path)
        files = [self.path] if self.path.is_file() else _images_in(self.path)
        if not files:
            raise AucliError(f"{path}: no images found")
        if fps <= 0:
            raise AucliError(f"{path}: --fps must be positive, got {fps}")
        self._files = files
        first = _read_image(files[0])
        if first is None:
            raise AucliError(f"{files[0]}: not a readable image")
        super().__init__(
            VideoInfo(
                path=str(path),
                kind="images",
                width=first.shape[1],
                height=first.shape[0],
                fps=float(fps),
                frame_count=len(files),
                duration=len(files) / fps,
                rotation=0,
                codec="images",
            )
        )

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        for position, file in enumerate(self._files):
            image = _read_image(file)
            if image is None:
                self.warnings.append(f"{file}: not a readable image, skipped")
                continue
            # Time follows the numbering, so a skipped image leaves a gap rather than a shift.
            yield Frame(index, position / self.info.fps, image)
            index += 1
            self.decoded = index


def open_video(path: str | Path, fps: float = DEFAULT_FPS) -> VideoReader | ImageSequenceReader:
    """Open a video file, an image file or a folder of numbered images for streaming."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageSequenceReader(path, fps)
    return VideoReader(path)


def expand_input(spec: str) -> list[Path]:
    """One command-line INPUT -> the videos (or image-sequence folders) it names.

    A file is taken as is. A folder holding videos is searched recursively for
    them; a folder holding only images is one image sequence. Anything else
    that looks like a glob is expanded. Raises ``AucliError`` naming ``spec``.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        videos = sorted(
            (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS),
            key=_natural_key,
        )
        if videos:
            return videos
        if _images_in(path):
            return [path]
        raise AucliError(f"{spec}: folder holds no videos or images")
    if glob.has_magic(spec):
        matches = sorted(glob.glob(spec, recursive=True), key=_natural_key)
        found = [p for m in matches for p in _expand_match(Path(m))]
        if not found:
            raise AucliError(f"{spec}: no files match")
        return found
    raise AucliError(f"{spec}: no such file or directory")


def _expand_match(path: Path) -> list[Path]:
    if path.is_dir():
        try:
            return expand_input(str(path))
        except AucliError:
            return []
    return [path]


def _images_in(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=_natural_key)


def _natural_key(path: str | Path) -> list:
    # "frame10" after "frame9": compare digit runs as numbers.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def _read_image(path: Path) -> np.ndarray | None:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # applies EXIF orientation
    return None if image is None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _rotate(image: np.ndarray, degrees: int) -> np.ndarray:
    """Rotate counter-clockwise by a multiple of 90 degrees, as PyAV's ``frame.rotation`` asks."""
    turns = int(math.floor(degrees / 90 + 0.5)) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def _reason(error: Exception) -> str:
    # PyAV messages repeat the path; keep FFmpeg's reason only.
    return getattr(error, "strerror", None) or str(error).split(":")[0]
