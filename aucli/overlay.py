"""The annotated video of ``aucli detect --overlay``: each tracked face's box, its 5
landmarks, its face_id and a compact bar per AU, drawn on the source frames.

The detect pipeline hands frames over one at a time as their rows become final
(``OverlayWriter.add``), so nothing holds the video. Frames keep the source's
presentation timestamps (variable frame rate included) and count; the display
rotation is already applied by the reader, so the output needs none. Audio is
copied packet by packet (transcoded to AAC only where the container cannot hold
the source codec). The file is written under a temporary name and renamed into
place when complete, like the tables.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np

from .errors import AucliError, UsageError
from .video import VideoInfo

# Containers an overlay may be written to, and the audio codecs each takes as they are.
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_MP4_AUDIO = {"aac", "mp3", "alac", "opus", "flac", "ac3", "eac3"}
COPY_AUDIO = {"mp4": _MP4_AUDIO, "mov": _MP4_AUDIO | {"pcm_s16le", "pcm_s24le", "pcm_s16be", "pcm_s24be"},
              "matroska": None}  # None: any codec
ENCODER = {"crf": "20", "preset": "veryfast"}

# RGB colours (frames are RGB).
FACE_COLOURS = [(0, 200, 255), (255, 170, 0), (120, 220, 60), (255, 80, 160), (180, 120, 255), (255, 255, 90)]
BAR_ON = (255, 140, 30)  # an active AU
BAR_OFF = (120, 150, 190)
TRACK = (60, 60, 60)
NO_FACE = (200, 200, 200)
TEXT = (255, 255, 255)
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass
class FaceMarks:
    """What the overlay draws for one face in one frame."""

    face_id: int
    box: np.ndarray  # (4,) x1, y1, x2, y2, source pixels
    landmarks: np.ndarray  # (5, 2)
    probs: np.ndarray  # (N,) AU probabilities
    active: np.ndarray  # (N,) bool decisions


def check_overlay_path(path: str | Path) -> Path:
    """The overlay's extension names its container; refuse others before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in CONTAINERS:
        raise UsageError(f"--overlay {path}: expected a .mp4, .m4v, .mov or .mkv file name")
    if path.is_dir():
        raise UsageError(f"--overlay {path}: is a directory")
    if not path.parent.is_dir():
        raise AucliError(f"--overlay {path}: folder {path.parent} does not exist")
    return path


class OverlayWriter:
    """Encodes annotated frames to H.264, in order, as they are added. Use as a context
    manager: leaving it normally publishes the file; leaving it on an error or Ctrl-C
    removes the temporary file and leaves no output."""

    def __init__(self, path: str | Path, info: VideoInfo, labels: list[str], thresholds: np.ndarray) -> None:
        self.path = check_overlay_path(path)
        self.info = info
        self.labels = labels
        self.thresholds = np.asarray(thresholds, float)
        self.frames = 0
        self._stack = ExitStack()

    def __enter__(self) -> OverlayWriter:
        try:
            self._open()
        except BaseException as failure:
            self._stack.__exit__(type(failure), failure, failure.__traceback__)
            raise
        return self

    def _open(self) -> None:
        import av

        from .writers import atomic_output

        self._tmp = self._stack.enter_context(atomic_output(self.path, suffix=self.path.suffix))
        kind = CONTAINERS[self.path.suffix.lower()]
        self._out = av.open(str(self._tmp), "w", format=kind,
                            options={"movflags": "+faststart"} if kind != "matroska" else {})
        self._stack.callback(self._out.close)
        self._time_base, rate = self._timing()
        width, height = _even(self.info.width), _even(self.info.height)
        self._video = self._out.add_stream("libx264", rate=rate, options=dict(ENCODER))
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.codec_context.time_base = self._time_base
        self._audio = None
        if self.info.kind == "video":
            audio = _AudioCopy(self.info, self._out, kind)
            self._stack.callback(audio.close)
            self._audio = audio if audio.stream is not None else None
        self._last_pts = -1

    def __exit__(self, kind, error, trace) -> bool:
        if kind is None:
            try:
                for packet in self._video.encode():  # drain the encoder
                    self._out.mux(packet)
                if self._audio:
                    self._audio.finish()
            except BaseException as failure:
                self._stack.__exit__(type(failure), failure, failure.__traceback__)
                raise
        # Closes the container (writing its index), then renames the file, or removes it on an error.
        return self._stack.__exit__(kind, error, trace)

    def add(self, image: np.ndarray, timestamp: float, faces: list[FaceMarks]) -> None:
        """Draw one frame's faces and encode it at its source timestamp."""
        import av

        if self._audio:
            self._audio.until(timestamp)
        picture = draw_faces(image, faces, self.labels, self.thresholds)
        if picture.shape[0] % 2 or picture.shape[1] % 2:  # yuv420p needs even sizes: repeat the edge
            picture = cv2.copyMakeBorder(picture, 0, picture.shape[0] % 2, 0, picture.shape[1] % 2,
                                         cv2.BORDER_REPLICATE)
        frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
        # The source's own clock: its PTS (relative to the stream start) in its time base.
        pts = max(round(timestamp / self._time_base), self._last_pts + 1)
        frame.pts, frame.time_base, self._last_pts = pts, self._time_base, pts
        for packet in self._video.encode(frame):
            self._out.mux(packet)
        self.frames += 1

    def _timing(self) -> tuple[Fraction, Fraction]:
        """(time base, nominal rate): the source stream's for videos, 1/fps steps for image folders."""
        rate = Fraction(self.info.fps).limit_denominator(1001)
        if self.info.kind == "video":
            import av

            with av.open(self.info.path) as source:
                stream = source.streams.video[0]
                return stream.time_base, Fraction(stream.average_rate or rate)
        return 1 / rate, rate


class _AudioCopy:
    """The source's first audio stream, muxed alongside the frames up to each frame's time."""

    def __init__(self, info: VideoInfo, out, kind: str) -> None:
        import av

        self._source = av.open(info.path)
        streams = self._source.streams
        self.stream = streams.audio[0] if streams.audio else None
        if self.stream is None:
            return
        video = streams.video[0]
        # Frames are timed from the video stream's start; shift the audio by as much to stay in sync.
        self._offset = float((video.start_time or 0) * video.time_base)
        name = self.stream.codec_context.codec.canonical_name
        allowed = COPY_AUDIO[kind]
        self._copy = allowed is None or name in allowed
        if self._copy:
            self._target = out.add_stream_from_template(self.stream)
        else:
            self._target = out.add_stream("aac", rate=self.stream.codec_context.sample_rate or 48000)
        self._out = out
        self._packets = self._source.demux(self.stream)
        self._pending = None

    def until(self, timestamp: float) -> None:
        """Mux every audio packet that starts before ``timestamp`` (s, video clock)."""
        while True:
            packet = self._pending or next(self._packets, None)
            self._pending = None
            if packet is None:
                return
            if packet.pts is None:  # the demuxer's empty end-of-stream packet
                continue
            start = float(packet.pts * packet.time_base) - self._offset
            if start > timestamp:
                self._pending = packet
                return
            self._write(packet, start)

    def finish(self) -> None:
        self.until(float("inf"))
        if not self._copy:
            for packet in self._target.encode(None):
                self._out.mux(packet)

    def close(self) -> None:
        self._source.close()

    def _write(self, packet, start: float) -> None:
        end = start + float((packet.duration or 0) * packet.time_base)
        if end <= 0:  # wholly before the first picture (a packet straddling it keeps its priming samples)
            return
        shift = round(self._offset / packet.time_base)
        if self._copy:
            packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = self._target
            self._out.mux(packet)
            return
        for frame in packet.decode():
            if frame.pts is not None:
                frame.pts -= round(self._offset / frame.time_base)
            for out_packet in self._target.encode(frame):
                self._out.mux(out_packet)


def draw_faces(image: np.ndarray, faces: list[FaceMarks], labels: list[str], thresholds: np.ndarray) -> np.ndarray:
    """A copy of the RGB frame with every face's box, landmarks, id and AU bars."""
    picture = image.copy()
    height, width = picture.shape[:2]
    line = max(1, round(min(height, width) / 320))
    if not faces:  # say so, so that a frame without marks does not look like a skipped one
        _tag(picture, "no face", (4, 0), NO_FACE)
    for face in faces:
        colour = FACE_COLOURS[face.face_id % len(FACE_COLOURS)]
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        cv2.rectangle(picture, (x1, y1), (x2, y2), colour, line + 1, cv2.LINE_AA)
        for x, y in face.landmarks:
            cv2.circle(picture, (int(round(x)), int(round(y))), line + 2, colour, -1, cv2.LINE_AA)
            cv2.circle(picture, (int(round(x)), int(round(y))), line + 2, (0, 0, 0), 1, cv2.LINE_AA)
        _tag(picture, f"face {face.face_id}", (x1, y1), colour)
        _bars(picture, face, labels, thresholds, (x1, y1, x2, y2))
    return picture


def _tag(picture: np.ndarray, text: str, corner: tuple[int, int], colour: tuple) -> None:
    """A filled label just above the box's top-left corner (inside it at the frame's top)."""
    scale = max(0.4, picture.shape[0] / 900)
    (w, h), base = cv2.getTextSize(text, FONT, scale, 1)
    x, y = corner
    top = y - h - base - 4 if y - h - base - 4 >= 0 else y
    cv2.rectangle(picture, (x, top), (x + w + 6, top + h + base + 4), colour, -1)
    cv2.putText(picture, text, (x + 3, top + h + 2), FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)


def _bars(picture: np.ndarray, face: FaceMarks, labels: list[str], thresholds: np.ndarray,
          box: tuple[int, int, int, int]) -> None:
    """One row per AU beside the box: name, a bar as long as the probability (orange when
    active), a tick at the threshold, and the probability to two decimals."""
    height, width = picture.shape[:2]
    row = int(np.clip(round(height / 26), 14, 32))  # 17 AUs take two thirds of a 360-line frame
    scale = cv2.getFontScaleFromHeight(FONT, int(row * 0.62))
    label_w = cv2.getTextSize("AU00", FONT, scale, 1)[0][0]
    value_w = cv2.getTextSize("0.00", FONT, scale, 1)[0][0]
    bar_w = 4 * row
    pad = max(2, row // 4)
    panel_w = pad + label_w + pad + bar_w + pad + value_w + pad
    panel_h = pad + row * len(labels) + pad
    x1, y1, x2, _ = box
    gap = max(4, row // 2)
    x = x2 + gap if x2 + gap + panel_w <= width else max(0, x1 - gap - panel_w)  # right of the box, else left
    y = int(np.clip(y1, 0, max(0, height - panel_h)))
    x_end, y_end = min(width, x + panel_w), min(height, y + panel_h)
    region = picture[y:y_end, x:x_end]
    region[:] = (region * 0.35).astype(np.uint8)  # darken, so bars read on any background
    for i, label in enumerate(labels):
        top = y + pad + i * row
        middle = top + row // 2
        colour = BAR_ON if face.active[i] else BAR_OFF
        cv2.putText(picture, label, (x + pad, middle + int(row * 0.3)), FONT, scale, TEXT, 1, cv2.LINE_AA)
        left = x + pad + label_w + pad
        thick = max(3, int(row * 0.55))
        y0, y1b = middle - thick // 2, middle - thick // 2 + thick
        cv2.rectangle(picture, (left, y0), (left + bar_w, y1b), TRACK, -1)
        length = int(round(float(np.clip(face.probs[i], 0, 1)) * bar_w))
        if length > 0:
            cv2.rectangle(picture, (left, y0), (left + length, y1b), colour, -1)
        tick = left + int(round(float(thresholds[i]) * bar_w))
        cv2.line(picture, (tick, y0 - 1), (tick, y1b + 1), TEXT, 1)
        cv2.putText(picture, f"{face.probs[i]:.2f}", (left + bar_w + pad, middle + int(row * 0.3)), FONT, scale,
                    colour if face.active[i] else TEXT, 1, cv2.LINE_AA)


def _even(value: int) -> int:
    return value + value % 2
