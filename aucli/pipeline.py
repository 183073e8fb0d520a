"""detect: frames -> faces -> aligned, smoothed tracks -> windows -> per-frame AU rows.

Everything streams: frames are decoded in groups of ``DETECTION_BATCH``, faces are
found on the group (full detection every few frames, followed in between:
faces.FaceFollower), aligned a few frames behind (landmark smoothing looks
``smoothing`` frames ahead), and the model runs once per frame as faces arrive
(aucli/windows.py). A frame's row is complete once all its faces have their
probabilities; rows come out in frame order.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch

from . import __version__
from .checkpoint import STARTER, named_checkpoint
from .errors import UsageError
from .faces import (
    FaceDetection,
    FaceDetector,
    FaceFollower,
    FaceTracker,
    TrackedFace,
    align_face,
    face_to_tensor,
    smooth_landmarks,
)
from .overlay import FaceMarks, OverlayWriter, check_overlay_path
from .video import DEFAULT_FPS, Frame, VideoInfo, open_video
from .windows import WindowPredictor

STAGES = ("decode", "faces", "model")
# MTCNN refines candidate boxes of all images of a call together, so a face's
# landmarks shift (~1e-5 px) with whatever else is in the call. Detecting in
# fixed groups of frames, counted from the start of the video, keeps results
# independent of --batch-size (which sizes the model's batches).
DETECTION_BATCH = 16
# Full face detection every this many frames; O-Net alone follows the faces in between
# (faces.FaceFollower). On the sample videos that finds a face on exactly the same frames
# as full detection on every frame, landmarks within its frame-to-frame jitter
# (tests/test_faces.py). 16 rather than 8: the face stage of the 472-frame sample took
# 2.4 s instead of 3.1; the starter's AU decisions there agree with those of full
# detection on every frame 97.1 % of the time, against 97.5 % with 8 (README, aucli detect: Faces).
REDETECT = 16
FACE_MODES = ("largest", "all")
NO_FACE_ID = {"largest": 0, "all": -1}  # face_id on rows of frames where no face was found
CHECKPOINT_HELP = (
    "pass --checkpoint PATH, set AUCLI_CHECKPOINT, or put one .pt file in ./weights/; "
    "get one by training (`aucli train`) or by converting a reference MDHR checkpoint "
    "(`aucli convert-official`)"
)


# With the face stage beside the model (Detector(overlap=...)), how many groups of
# DETECTION_BATCH frames it may run ahead: their frames and aligned faces wait in memory.
AHEAD_GROUPS = 2


def overlap_default(device: torch.device) -> bool:
    """Run the face stage on a thread of its own, beside the model? On a CPU with more than one
    torch thread, and only where OpenMP's idle threads sleep (``OMP_WAIT_POLICY=PASSIVE``, which
    ``aucli detect`` sets unless the environment does). Spinning idle threads keep both cores busy,
    and the face thread then only delays the model's multi-threaded operations (docs/speed.md)."""
    return (device.type == "cpu" and torch.get_num_threads() > 1
            and os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive")


@dataclass
class _Step:
    """One frame out of the face stage: its faces, the aligned faces now ready for the model
    (of this or earlier frames) and the face segments that ended on it. ``index`` None: the
    end of the video, which only releases what is still waiting."""

    index: int | None
    timestamp: float
    faces: list[TrackedFace]
    image: np.ndarray | None  # kept only for --overlay
    ready: list
    ended: set[int]


def _idle_priority() -> None:
    """Let the calling thread run only on a core nothing else of this machine wants (Linux's
    SCHED_IDLE; elsewhere nothing changes). The face thread then never keeps one of the model's
    OpenMP threads waiting for a core, and runs whenever the model leaves one free (docs/speed.md)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


class _Ahead:
    """Runs an iterator on a worker thread, at most ``depth`` items ahead of the caller;
    iterating gives its items in order and raises what it raised. ``close`` stops the
    thread and waits for it, so that what it reads (a video) can be closed after."""

    def __init__(self, items: Iterator, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="aucli-faces", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        _idle_priority()
        try:
            for item in items:
                if not self._put((True, item)):
                    return
            self._put((False, None))
        except BaseException as error:  # handed to the caller, raised there
            self._put((False, error))

    def _put(self, entry: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            more, value = self._queue.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Progress(Protocol):
    def start(self, info: VideoInfo) -> None: ...
    def advance(self, frames: int) -> None: ...


def resolve_checkpoint(checkpoint: str | Path | None = None) -> Path:
    """--checkpoint, else $AUCLI_CHECKPOINT, else the single .pt file in ./weights/, else the shipped starter.

    ``starter`` as --checkpoint or $AUCLI_CHECKPOINT names the shipped starter."""
    chosen = checkpoint or os.environ.get("AUCLI_CHECKPOINT")
    if chosen:
        path = named_checkpoint(chosen)
        if not path.is_file():
            raise UsageError(f"{path}: checkpoint not found; {CHECKPOINT_HELP}")
        return path
    found = sorted(Path("weights").glob("*.pt"))
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        names = ", ".join(str(p) for p in found)
        raise UsageError(f"weights/ holds several checkpoints ({names}); choose one with --checkpoint")
    if STARTER.is_file():
        return STARTER
    raise UsageError(f"no checkpoint (and the shipped starter model is missing from this install): {CHECKPOINT_HELP}")


def resolve_device(device: str | torch.device = "auto", option: str = "--device") -> torch.device:
    """auto -> the first CUDA device when present, else the CPU. ``option`` names it in errors."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{option} {name}: expected auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {name}: CUDA is not available on this machine")
        if (chosen.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif chosen.type != "cpu":
        raise UsageError(f"{option} {name}: expected auto, cpu, cuda or cuda:N")
    return chosen


@contextmanager
def float32_convolutions(*devices: torch.device) -> Iterator[None]:
    """Float32 convolutions computed in float32 on a GPU inside the block (restored after).

    cuDNN computes them in TF32 by default on NVIDIA GPUs since Ampere (a 10-bit mantissa,
    ``torch.backends.cudnn.allow_tf32``): ``--precision fp32`` would then not be the reference
    arithmetic, and the face detector not the CPU's. The flag is torch's, for the whole
    process; nothing changes where no device is a GPU."""
    if not any(torch.device(d).type == "cuda" for d in devices):
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


class StageTimer:
    """Wall time spent per pipeline stage."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


@dataclass
class _Record:
    """One decoded frame waiting for the probabilities of its faces (the image
    itself is not kept here: only the aligner holds it, a few frames at most)."""

    index: int
    timestamp: float
    faces: list[TrackedFace]
    probs: list[np.ndarray | None] = field(default_factory=list)
    image: np.ndarray | None = None  # kept only for --overlay, until the row is final
    # Per face, decisions that are not just probs >= thresholds (a calibration head's vote).
    decisions: list[np.ndarray | None] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(p is not None for p in self.probs)


@dataclass(frozen=True)
class _KeptFace:
    """A face whose row waits for the end of the video: its box and landmarks are row
    ``index`` of a _KeptRows."""

    face_id: int
    segment: int
    confidence: float
    index: int


class _KeptRows:
    """Rows kept until the end of a video, in blocks of anonymous memory maps; a caller
    holds row numbers, not arrays. With a calibration head, every face's MDHR outputs,
    head inputs, box and landmarks wait for the end of the video.

    Kept as small numpy arrays (and views, whose shapes numpy also allocates with malloc)
    among the model's large temporary buffers in the malloc heap, they split its free
    space and the heap grew with the video: peak RSS 2.1 GiB on a 3-minute video against
    1.2 GiB on 16 s of it (starter model). Kept here, memory stays flat (docs/speed.md).
    """

    def __init__(self, dtype: type = np.float32, rows_per_block: int = 2048) -> None:
        self.dtype, self.rows_per_block = np.dtype(dtype), rows_per_block
        self._blocks: list[np.ndarray] = []
        self._count = 0

    def keep(self, row: np.ndarray) -> int:
        """Store a copy of ``row`` (D,); its row number."""
        used = self._count % self.rows_per_block
        if used == 0:
            buffer = mmap.mmap(-1, self.rows_per_block * len(row) * self.dtype.itemsize)
            self._blocks.append(np.frombuffer(buffer, self.dtype).reshape(self.rows_per_block, len(row)))
        self._blocks[-1][used] = row
        self._count += 1
        return self._count - 1

    def take(self, numbers: np.ndarray) -> np.ndarray:
        """The rows with these row numbers, (len(numbers), D), gathered without joining every block."""
        numbers = np.asarray(numbers, np.int64)
        width = self._blocks[0].shape[1] if self._blocks else 0
        out = np.empty((len(numbers), width), self.dtype)
        block, offset = np.divmod(numbers, self.rows_per_block)
        for b in np.unique(block):
            chosen = block == b
            out[chosen] = self._blocks[b][offset[chosen]]
        return out

    def rows(self) -> np.ndarray:
        """Every row kept, (n, D), in the order kept."""
        if not self._blocks:
            return np.zeros((0, 0), self.dtype)
        return np.concatenate(self._blocks)[: self._count]

    def keep_face(self, face: TrackedFace) -> _KeptFace:
        d = face.detection
        return _KeptFace(face.face_id, face.segment, d.confidence,
                         self.keep(np.concatenate([d.box, d.landmarks.ravel()])))


class _Aligner:
    """Aligns faces with landmarks smoothed over their segment, ``radius`` frames behind."""

    def __init__(self, radius: int) -> None:
        self.radius = max(0, radius)
        self._segments: dict[int, dict[str, Any]] = {}

    def add(self, segment: int, key: Hashable, image: np.ndarray, landmarks: np.ndarray) -> list:
        seg = self._segments.setdefault(segment, {"first": 0, "landmarks": [], "waiting": deque()})
        seg["landmarks"].append(landmarks)
        seg["waiting"].append((key, image))
        return self._ready(segment, final=False)

    def end(self, segment: int) -> list:
        return self._ready(segment, final=True) if segment in self._segments else []

    def _ready(self, segment: int, final: bool) -> list:
        """(segment, key, aligned face) for each face whose smoothing window is known."""
        seg = self._segments[segment]
        lms, waiting, r = seg["landmarks"], seg["waiting"], self.radius
        known = seg["first"] + len(lms)  # segment positions known so far: first .. known-1
        out = []
        while waiting:
            position = known - len(waiting)
            if not final and position + r >= known:
                break
            lo = max(position - r, seg["first"])
            hi = min(position + r + 1, known)
            # Passing just lo..hi gives the same value as smoothing the whole segment.
            window = np.stack(lms[lo - seg["first"] : hi - seg["first"]])
            smoothed = smooth_landmarks(window, r)[position - lo]
            key, image = waiting.popleft()
            out.append((segment, key, align_face(image, smoothed)))
        # Keep only the landmarks later faces of this segment still need.
        drop = max(0, known - len(waiting) - r - seg["first"])
        del lms[:drop]
        seg["first"] += drop
        if final:
            del self._segments[segment]
        return out

    def open_segments(self) -> list[int]:
        return list(self._segments)


class Detector:
    """A loaded checkpoint and face detector, ready to run on any number of videos."""

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        device: str | torch.device = "auto",
        batch_size: int = 16,
        faces: str = "largest",
        threshold: float | None = None,
        fps: float = DEFAULT_FPS,
        smoothing: int = 2,
        min_face_size: int = 40,
        min_confidence: float = 0.9,
        precision: str = "auto",
        redetect: int = REDETECT,
        overlap: bool | None = None,
        face_device: str | torch.device | None = None,
    ) -> None:
        from .checkpoint import file_sha256, load_model
        from .inference import InferenceModel, resolve_precision

        if faces not in FACE_MODES:
            raise UsageError(f"--faces {faces}: expected one of {', '.join(FACE_MODES)}")
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size}: must be at least 1")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise UsageError(f"--threshold {threshold}: must lie between 0 and 1")
        if redetect < 1:
            raise UsageError(f"--redetect {redetect}: must be at least 1")
        self.device = resolve_device(device)
        # MTCNN's device: the model's unless chosen (on a GPU machine the face stage can stay on the CPU).
        self.face_device = self.device if face_device is None else resolve_device(face_device, "--face-device")
        self.precision = resolve_precision(precision, self.device)
        self.checkpoint = resolve_checkpoint(checkpoint)
        # The file's hash goes into the output's metadata. hashlib releases the GIL, so it
        # runs beside the model's loading (0.2 s of a ResNet-50 checkpoint's 365 MB).
        with ThreadPoolExecutor(1) as pool:
            sha256 = pool.submit(file_sha256, self.checkpoint)
            self.model = load_model(self.checkpoint, self.device)
        # Runs the checkpoint's MDHR with BN folded, at the chosen precision
        # (aucli/inference.py); it rearranges self.model in place for that.
        self.runner = InferenceModel(self.model, self.precision)
        meta = self.model.metadata
        # Per-video calibration (aucli/calibration.py): rows become final at the end of the video.
        self.video_head = getattr(self.model, "video_head", None)
        self.labels = [f"AU{au:02d}" for au in meta.aus]
        self.thresholds = np.array(
            [threshold] * len(meta.aus) if threshold is not None else meta.thresholds, np.float64
        )
        self.batch_size, self.faces, self.fps, self.smoothing = batch_size, faces, fps, smoothing
        self.redetect = redetect
        # The face stage on a thread of its own, beside the model (same results either way).
        self.overlap = overlap_default(self.device) if overlap is None else bool(overlap)
        self.face_detector = FaceDetector(self.face_device, min_face_size, min_confidence)
        self.model_info = {
            "checkpoint": str(self.checkpoint),
            "sha256": sha256.result(),
            "au_set": meta.au_set,
            "aus": self.labels,
            "au_names": list(meta.au_names),
            "thresholds": [float(t) for t in self.thresholds],
            "clip_length": meta.clip_length,
            "k": meta.k,
            "backbone": meta.backbone,
            "source": meta.source,
            "precision": self.precision,
            "video_calibration": self.video_head is not None,
            # Frames of the majority vote over each face track's decisions (0: AUxx_c = AUxx_p >= threshold).
            "decision_vote": self.video_head.vote if self.video_head is not None else 0,
        }

    def _preprocess(self, faces: np.ndarray) -> torch.Tensor:
        meta = self.model.metadata
        return face_to_tensor(faces, meta.input_size, tuple(meta.mean), tuple(meta.std))

    def run(
        self, path: str | Path, progress: Progress | None = None, overlay: str | Path | None = None
    ) -> pd.DataFrame:
        """One video (or image folder) -> the per-frame table, metadata in ``.attrs``.

        ``overlay``: also write the annotated video there (aucli/overlay.py), fed
        with each frame as its row becomes final; the table is the same either way.
        """
        if overlay is not None:
            check_overlay_path(overlay)
        timer = StageTimer()
        started = time.perf_counter()
        reader = open_video(path, self.fps)
        if progress is not None:
            progress.start(reader.info)
        meta = self.model.metadata
        head = self.video_head
        frame_features = None
        if head is not None:
            def frame_features(frames, final_map):
                return head.frame_features(frames, final_map, meta.mean, meta.std)
        predictor = WindowPredictor(
            self.runner, meta.clip_length, self._preprocess, self.batch_size, self.device, frame_features
        )
        records: dict[int, _Record] = {}
        kept, kept_faces = _KeptRows(np.float32), _KeptRows(np.float64)
        order: deque[int] = deque()
        rows: list[list] = []
        finished: list[_Record] = []  # with a calibration head: every record, until the video ends

        def feed(ready: list, ended: set[int] = frozenset()) -> None:
            with timer("model"):
                for segment, key, face in ready:
                    predictor.add(segment, key, face)
                for segment in ended:
                    predictor.end(segment)
                for (index, j), probs in predictor.pop_results():
                    if head is None:
                        records[index].probs[j] = probs
                    else:  # until the end of the video: a row number (_KeptRows)
                        records[index].probs[j] = kept.keep(np.concatenate([probs, predictor.features.pop((index, j))]))
            while order and records[order[0]].complete:
                record = records.pop(order.popleft())
                if head is not None:
                    record.faces = [kept_faces.keep_face(face) for face in record.faces]
                    finished.append(record)
                    continue
                rows.extend(self._rows(record))
                if drawer is not None:
                    with timer("overlay"):
                        drawer.add(record.image, record.timestamp, self._marks(record))

        with ExitStack() as stack:
            stack.enter_context(reader)
            stack.enter_context(float32_convolutions(self.device, self.face_device))
            drawer = None
            if overlay is not None:
                drawer = stack.enter_context(OverlayWriter(overlay, reader.info, self.labels, self.thresholds))
            steps = self._face_stage(reader, timer, keep_images=drawer is not None and head is None)
            if self.overlap:
                ahead = _Ahead(steps, AHEAD_GROUPS)
                stack.callback(ahead.close)  # before the video closes: the thread reads it
                steps = iter(ahead)
            for group in steps:
                for step in group:
                    if step.index is not None:
                        records[step.index] = _Record(step.index, step.timestamp, step.faces,
                                                      [None] * len(step.faces), step.image)
                        order.append(step.index)
                    feed(step.ready, step.ended)
                if progress is not None:
                    progress.advance(sum(step.index is not None for step in group))
            with timer("model"):
                predictor.flush()
            feed([])
            if head is not None:
                with timer("model"):
                    self._calibrate(finished, kept, kept_faces)
                rows = [row for record in finished for row in self._rows(record)]
                if drawer is not None:
                    self._draw_again(path, finished, drawer, timer)
        assert not order, "every frame gets a row"
        table = self._table(rows)
        table.attrs.update(
            self._metadata(reader, table, timer.seconds, time.perf_counter() - started)
        )
        return table

    def _face_stage(self, reader, timer: StageTimer, keep_images: bool) -> Iterator[list[_Step]]:
        """Decode, find, follow, track and align faces: per group of DETECTION_BATCH frames, a
        _Step per frame; at the end, one more group that releases the faces still waiting."""
        follower = FaceFollower(self.face_detector, self.redetect)
        tracker = FaceTracker(self.faces)
        aligner = _Aligner(self.smoothing)
        active: set[int] = set()
        for chunk in _batches(reader, DETECTION_BATCH, timer):
            with timer("faces"):
                detections = follower([f.image for f in chunk])
                group = []
                for frame, found in zip(chunk, detections):
                    tracked = tracker.update(found)
                    now = {t.segment for t in tracked}
                    ended = active - now
                    ready = [item for s in ended for item in aligner.end(s)]
                    for j, face in enumerate(tracked):
                        ready += aligner.add(face.segment, (frame.index, j), frame.image, face.detection.landmarks)
                    active = now
                    group.append(_Step(frame.index, frame.timestamp, tracked, frame.image if keep_images else None,
                                       ready, ended))
            yield group
        with timer("faces"):
            ready = [item for s in aligner.open_segments() for item in aligner.end(s)]
        yield [_Step(None, 0.0, [], None, ready, set(active))]

    def _calibrate(self, records: list[_Record], kept: _KeptRows, kept_faces: _KeptRows) -> None:
        """Replace MDHR's probabilities with the head's, each face track (face_id) calibrated
        over all of its frames in the video, with the head's decisions (its vote over the track's
        frames, if it has one), and give the records their faces back."""
        faces = [(record, j) for record in records for j in range(len(record.faces))]
        if not faces:
            return
        n = len(self.labels)
        numbers = np.array([record.probs[j] for record, j in faces])
        groups = np.array([record.faces[j].face_id for record, j in faces])
        calibrated = np.empty((len(faces), n), np.float32)
        decided = np.empty((len(faces), n), bool)
        for g in np.unique(groups):  # one track's kept rows at a time: (F_g, N + D), in frame order
            chosen = np.flatnonzero(groups == g)
            inputs = kept.take(numbers[chosen])
            calibrated[chosen] = self.video_head.calibrate(inputs[:, :n], inputs[:, n:], groups[chosen])
            decided[chosen] = self.video_head.decide(calibrated[chosen], self.thresholds, groups[chosen])
        boxes = kept_faces.rows()
        for record in records:
            record.decisions = [None] * len(record.faces)
        for (record, j), p, d in zip(faces, calibrated, decided):
            face = record.faces[j]
            row = boxes[face.index]
            record.probs[j] = p
            record.decisions[j] = d
            record.faces[j] = TrackedFace(face.face_id, face.segment,
                                          FaceDetection(row[:4], row[4:].reshape(-1, 2), face.confidence))

    def _draw_again(self, path, records: list[_Record], drawer, timer: StageTimer) -> None:
        """The overlay once the calibrated rows are final: a second decode of the video."""
        by_index = {record.index: record for record in records}
        with open_video(path, self.fps) as again:
            for frame in again:
                record = by_index.get(frame.index)
                if record is not None:
                    with timer("overlay"):
                        drawer.add(frame.image, record.timestamp, self._marks(record))

    def _rows(self, record: _Record) -> list[list]:
        if not record.faces:
            empty = [np.nan] * 4 + [None] * len(self.labels) + [np.nan] * len(self.labels)
            return [[record.index + 1, NO_FACE_ID[self.faces], record.timestamp, 0.0, 0] + empty]
        rows = []
        for j, (face, probs) in enumerate(zip(record.faces, record.probs)):
            x1, y1, x2, y2 = face.detection.box
            decisions = self._decisions(record, j).astype(int).tolist()
            rows.append(
                [record.index + 1, face.face_id, record.timestamp, face.detection.confidence, 1,
                 x1, y1, x2 - x1, y2 - y1, *decisions, *probs.astype(np.float64).tolist()]
            )
        return rows

    def _marks(self, record: _Record) -> list[FaceMarks]:
        """What the overlay draws: the same boxes, probabilities and decisions as the rows."""
        return [
            FaceMarks(face.face_id, face.detection.box, face.detection.landmarks, probs, self._decisions(record, j))
            for j, (face, probs) in enumerate(zip(record.faces, record.probs))
        ]

    def _decisions(self, record: _Record, j: int) -> np.ndarray:
        """Face j's occurrence decisions: the calibration head's (after its vote), else probs >= thresholds."""
        if record.decisions:
            return record.decisions[j]
        return record.probs[j] >= self.thresholds

    def _table(self, rows: list[list]) -> pd.DataFrame:
        columns = table_columns(self.labels)
        table = pd.DataFrame(rows, columns=columns)
        return format_table(table, self.labels)

    def _metadata(self, reader, table: pd.DataFrame, seconds: dict, total: float) -> dict:
        frames = int(table["frame"].nunique()) if len(table) else 0
        with_face = int(table.loc[table["success"] == 1, "frame"].nunique()) if len(table) else 0
        video = reader.info.to_dict()
        video["decoded_frames"] = reader.decoded
        return {
            "aucli_version": __version__,
            "video": video,
            "model": dict(self.model_info, device=str(self.device), face_device=str(self.face_device),
                          faces=self.faces, redetect=self.redetect, overlap=self.overlap),
            "summary": {
                "frames": frames,
                "frames_with_face": with_face,
                "seconds": total,
                "stages": {k: round(v, 4) for k, v in seconds.items()},
            },
            "warnings": list(reader.warnings),
        }


def table_columns(labels: list[str]) -> list[str]:
    """OpenFace-style column names; AU columns in the checkpoint's AU order."""
    base = ["frame", "face_id", "timestamp", "confidence", "success", "face_x", "face_y", "face_w", "face_h"]
    return base + [f"{au}_c" for au in labels] + [f"{au}_p" for au in labels]


def format_table(table: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Round and type the columns as written, so the DataFrame, the CSV and the
    JSON read back all hold the same values."""
    table = table.copy()
    for column in ("frame", "face_id", "success"):
        table[column] = table[column].astype("int64")
    table["timestamp"] = table["timestamp"].astype(float).round(3)
    table["confidence"] = table["confidence"].astype(float).round(4)
    for column in ("face_x", "face_y", "face_w", "face_h"):
        table[column] = table[column].astype(float).round(1)
    for au in labels:
        table[f"{au}_c"] = table[f"{au}_c"].astype("Int64")
        table[f"{au}_p"] = table[f"{au}_p"].astype(float).round(4)
    return table


def _batches(reader, size: int, timer: StageTimer) -> Iterator[list[Frame]]:
    """Frames in lists of ``size``, the decode time charged to its stage."""
    frames = iter(reader)
    while True:
        with timer("decode"):
            chunk = [frame for _, frame in zip(range(size), frames)]
        if not chunk:
            return
        yield chunk


def detect(
    path: str | Path,
    checkpoint: str | Path | None = None,
    *,
    progress: Progress | None = None,
    overlay: str | Path | None = None,
    **options: Any,
) -> pd.DataFrame:
    """AU table of one video: one row per decoded frame (per face with ``faces="all"``).

    Options: device ("auto"), batch_size (16), faces ("largest" | "all"),
    threshold (None: the checkpoint's per-AU thresholds), fps (for image
    folders, 30), smoothing (landmark smoothing radius, 2; 0 turns it off),
    min_face_size (40), min_confidence (0.9), precision ("auto" | "fp32" | "bf16"),
    redetect (full face detection every N frames, 16; 1: every frame), overlap (decode and the
    face stage on a thread of their own beside the model; None: on a CPU with more than one torch
    thread where ``OMP_WAIT_POLICY=PASSIVE``; the table is the same either way), face_device (MTCNN's
    device, "auto" | "cpu" | "cuda[:N]"; None: the model's). ``overlay``: also
    write the annotated video (.mp4, .mov, .mkv) there. Metadata is in ``.attrs``. The command line
    also sets ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for torch's large tensors, README): set it, and
    ``OMP_WAIT_POLICY``, before importing torch to get the same here. It also fixes two of glibc's
    malloc thresholds (``aucli.cli._keep_freed_memory``), which only the command line does.
    """
    return Detector(checkpoint, **options).run(path, progress, overlay=overlay)
