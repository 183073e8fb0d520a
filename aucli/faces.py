"""Faces: MTCNN detection, 5-point alignment, landmark smoothing and tracking.

``align_face`` and ``face_to_tensor`` are the only way aucli turns a frame into
model input; dataset preparation calls the same two functions, so training and
detection see identical crops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .model import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

ALIGN_SIZE = 256  # aligned crop size, as the reference's training images (spec §6.3)

# Canonical positions of the 5 MTCNN landmarks in a 256x256 crop: left eye,
# right eye, nose tip, left and right mouth corner (image left/right).
# Chosen from average adult proportions, with the eye distance D = 72 px:
# brows sit about 0.4 D above the eyes (y ~ 55) and the chin about 0.7 D below
# the mouth (y ~ 217). That keeps forehead wrinkles (AU1/AU2) and the chin
# (AU17) inside the crop with ~35 px to spare, so training's random 224 crop
# (offsets 0..32, spec §6.3) never cuts them off, and it lands the features
# on the rows of the 7x7 map the model reads them from (spec §0.2, §3.1; one
# row = 36.6 px): brows and eyes in rows 0-2 (eyes at row 2.3), nose in rows
# 2-4 (row 3.4), mouth and chin in rows 4-6 (mouth at row 4.6, chin at 5.9).
TEMPLATE = np.array(
    [[92.0, 84.0], [164.0, 84.0], [128.0, 126.0], [99.0, 167.0], [157.0, 167.0]],
    dtype=np.float64,
)


@dataclass
class FaceDetection:
    """One face found by the detector, in source-image pixels."""

    box: np.ndarray  # (4,) float x1, y1, x2, y2
    landmarks: np.ndarray  # (5, 2) float (x, y): left eye, right eye, nose, left/right mouth corner
    confidence: float
    # The square box O-Net looked at to place the landmarks; FaceFollower places the
    # next frame's box the same way relative to the face.
    seen: np.ndarray | None = None

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))


class FaceDetector:
    """MTCNN face detection (aucli/mtcnn.py; the weights ship inside facenet-pytorch)."""

    def __init__(
        self,
        device: str | torch.device = "cpu",
        min_face_size: int = 40,
        min_confidence: float = 0.9,
    ) -> None:
        from .mtcnn import MTCNN

        self.device = torch.device(device)
        self.min_confidence = min_confidence
        # MTCNN's layers draw random initial weights before its own are loaded; keep that
        # off the caller's generator, so that detecting faces never changes what a seeded
        # run (training on freshly generated synthetic data, a notebook) draws next.
        with torch.random.fork_rng(devices=[]):
            self._mtcnn = MTCNN(self.device, min_face_size)

    def detect(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        """RGB uint8 (H, W, 3) images -> faces per image, largest first (the full cascade)."""
        results: list[list[FaceDetection]] = [[] for _ in images]
        # The cascade batches only same-size images; image sequences may mix sizes.
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        # One frame is many small operations: one thread. A group of frames makes them
        # large enough for all the process's threads: on 2 idle cores the face stage ran
        # 1.4-1.6x faster on the 960x540 samples, where most groups hold no face.
        with cpu_threads(self.device, 1 if len(images) == 1 else torch.get_num_threads()):
            for indices in by_shape.values():
                found = self._mtcnn.detect(np.stack([images[i] for i in indices]))
                for i, (boxes, landmarks, seen) in zip(indices, found):
                    faces = [self._face(*face) for face in zip(boxes, landmarks, seen)]
                    results[i] = _largest_first([f for f in faces if f is not None])
        return results

    def refine(self, image: np.ndarray, squares: np.ndarray) -> list[FaceDetection | None]:
        """O-Net alone on square boxes (n, 4) where faces are expected in ``image`` -> the
        face found in each box, or None where O-Net does not confirm one."""
        out: list[FaceDetection | None] = [None] * len(squares)
        if len(squares):
            with cpu_threads(self.device, 1):
                boxes, landmarks, index = self._mtcnn.refine(image, squares)
            for box, points, i in zip(boxes, landmarks, index):
                out[int(i)] = self._face(box, points, squares[int(i)])
        return out

    def _face(self, box: np.ndarray, landmarks: np.ndarray, seen: np.ndarray) -> FaceDetection | None:
        if box[4] < self.min_confidence:
            return None
        return FaceDetection(
            np.asarray(box[:4], np.float64), np.asarray(landmarks, np.float64), float(box[4]),
            np.asarray(seen, np.float64),
        )


def _largest_first(faces: list[FaceDetection]) -> list[FaceDetection]:
    return sorted(faces, key=lambda f: f.area, reverse=True)


class FaceFollower:
    """Faces of a video, frame after frame, without the full cascade on every frame.

    A full detection runs every ``redetect`` frames (counted from the first),
    whenever a known face is lost, and while no face is known (then on the
    rest of the group of frames at once).
    On the frames between, each known face is looked for with O-Net alone, on a
    square box placed relative to its previous landmarks exactly as the last
    full detection's O-Net box sat relative to its landmarks; tying the box to
    the landmarks, not to the previous box, keeps it from drifting. That costs
    one 48x48 network instead of the image pyramid. ``redetect=1`` runs the
    full cascade on every frame. With several faces (``--faces all``), a face
    that enters the picture is found at the next full detection.
    """

    def __init__(self, detector: FaceDetector, redetect: int = 1) -> None:
        self.detector = detector
        self.redetect = max(1, redetect)
        self._frame = 0
        self._faces: list[FaceDetection] = []
        self._anchors: list[np.ndarray] = []  # per face: O-Net box centre and side in landmark units

    def __call__(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        """The next group of frames of the video -> faces per frame, largest first."""
        out: list[list[FaceDetection]] = []
        while len(out) < len(images):
            if self.redetect == 1 or not self._faces:
                # No face to follow: the full cascade on the rest of the group at once
                # (batching is cheaper per frame; groups are fixed by the caller).
                found = self.detector.detect(images[len(out):])
                last = found[-1]
                self._anchors = [_anchor(f.landmarks, f.seen) for f in last]
            else:
                found = [self._next(images[len(out)])]
            out += found
            self._faces = found[-1]
            self._frame += len(found)
        return [list(faces) for faces in out]

    def _next(self, image: np.ndarray) -> list[FaceDetection]:
        """One frame, with faces known on the frame before."""
        if self._frame % self.redetect:
            squares = np.stack([_place(f.landmarks, a) for f, a in zip(self._faces, self._anchors)])
            found = self.detector.refine(image, squares)
            if all(f is not None for f in found):
                order = np.argsort([-f.area for f in found], kind="stable")
                self._anchors = [self._anchors[i] for i in order]
                return [found[i] for i in order]
        # Due for a full detection, or a face was lost: look again everywhere.
        faces = self.detector.detect([image])[0]
        self._anchors = [_anchor(f.landmarks, f.seen) for f in faces]
        return faces


def _landmark_frame(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre and size (RMS distance from the centre) of 5 landmarks."""
    centre = landmarks.mean(0)
    return centre, float(np.sqrt(((landmarks - centre) ** 2).sum(1).mean()))


def _anchor(landmarks: np.ndarray, square: np.ndarray) -> np.ndarray:
    """A square box relative to the landmarks: (dx, dy, side) in units of their size."""
    centre, size = _landmark_frame(landmarks)
    box_centre = (square[:2] + square[2:]) / 2
    return np.array([*(box_centre - centre) / size, (square[2] - square[0]) / size])


def _place(landmarks: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The square box (x1, y1, x2, y2) that ``anchor`` puts around these landmarks."""
    centre, size = _landmark_frame(landmarks)
    box_centre = centre + anchor[:2] * size
    half = anchor[2] * size / 2
    return np.array([*(box_centre - half), *(box_centre + half)])


@contextmanager
def cpu_threads(device: torch.device, threads: int) -> Iterator[None]:
    """Run torch on ``threads`` CPU threads inside the block (no effect on other devices).

    Following a face is many small operations; on 2 cores, splitting each across
    threads cost more in waiting than it gained, and far more so when another
    process held a core (~20 ms instead of ~0.2 ms per crop).
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, shift; no reflection) mapping
    ``source`` points onto ``target`` points (Umeyama 1991) -> (2, 3) affine matrix."""
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    s, t = source - mean_s, target - mean_t
    variance = (s**2).sum() / len(s)
    if variance < 1e-12:
        raise ValueError("landmarks collapse to one point; cannot align")
    u, sigma, vt = np.linalg.svd(t.T @ s / len(s))
    flip = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ flip @ vt
    scale = float((sigma * np.diag(flip)).sum() / variance)
    shift = mean_t - scale * rotation @ mean_s
    return np.hstack([scale * rotation, shift[:, None]])


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = ALIGN_SIZE) -> np.ndarray:
    """Warp the face with these 5 landmarks onto the canonical template -> (size, size, 3) uint8 RGB."""
    matrix = similarity_transform(landmarks, TEMPLATE * (size / ALIGN_SIZE))
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def face_to_tensor(
    faces: np.ndarray,
    size: int = INPUT_SIZE,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Aligned faces (H, W, 3) or (M, H, W, 3) uint8 RGB -> (3|M,3, size, size) model input.

    The whole 256 crop is scaled to 224, no centre crop, then ImageNet
    normalisation: the reference's test transform (spec §6.3). The resize is
    torch's antialiased bilinear on the uint8 pixels, which follows PIL's
    bilinear resize (what the reference used) and rounds to uint8 as PIL does:
    within one grey level of PIL (tests/test_faces.py), and about 3x faster
    than resizing in float32 (16 faces: 17 -> 5 ms on 2 cores).
    """
    x = torch.from_numpy(np.ascontiguousarray(faces))
    single = x.dim() == 3
    x = (x[None] if single else x).permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size),
                          mode="bilinear", align_corners=False, antialias=True)
    x = x.float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    return x[0] if single else x


def smooth_landmarks(landmarks: np.ndarray, radius: int = 2) -> np.ndarray:
    """(F, 5, 2) landmarks of one track segment -> the same, lightly smoothed over time.

    MFD differences neighbouring frames, so detector jitter in the landmarks
    would reach the model as fake motion. A binomial kernel of 2*radius+1 taps
    (1 4 6 4 1 for radius 2, sigma ~ 1 frame) is cut at the segment ends and
    renormalised, so frame i depends only on frames i-radius..i+radius of its
    own segment: any window of the segment holding those gives the same value.
    """
    landmarks = np.asarray(landmarks, np.float64)
    if radius <= 0 or len(landmarks) < 2:
        return landmarks.copy()
    taps = np.array([1.0])
    for _ in range(2 * radius):
        taps = np.convolve(taps, [1.0, 1.0])
    count = len(landmarks)
    out = np.empty_like(landmarks)
    for i in range(count):
        lo, hi = max(i - radius, 0), min(i + radius + 1, count)
        w = taps[lo - i + radius : hi - i + radius]
        out[i] = np.tensordot(w / w.sum(), landmarks[lo:hi], axes=1)
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class TrackedFace:
    """A detection with its identity: the face it belongs to and its unbroken run."""

    face_id: int  # stable across the video (0 for the one face of --faces largest)
    segment: int  # new whenever this face's run of consecutive frames starts again
    detection: FaceDetection


class FaceTracker:
    """Greedy IoU tracking, frame by frame.

    ``mode="all"`` keeps every face with a stable id; a face that vanishes and
    comes back near its last box within ``memory`` frames keeps its id, but
    its segment is split, since the model needs consecutive frames.
    ``mode="largest"`` follows one main face: it stays with the face it
    follows while that face is found, and otherwise takes the largest face.
    """

    def __init__(self, mode: str = "largest", min_iou: float = 0.3, memory: int = 30) -> None:
        if mode not in ("largest", "all"):
            raise ValueError(f"unknown face mode {mode!r}")
        self.mode = mode
        self.min_iou = min_iou
        self.memory = memory
        self._last: dict[int, tuple[int, np.ndarray]] = {}  # track id -> (frame, box)
        self._runs: dict[int, int] = {}  # track id -> segment, for tracks output last frame
        self._frame = -1
        self._next_track = 0
        self._next_segment = 0
        self._main: int | None = None

    def update(self, detections: list[FaceDetection]) -> list[TrackedFace]:
        """Faces of the next frame (largest first) -> the tracked faces to report."""
        self._frame += 1
        tracks = self._match(detections)
        if self.mode == "largest":
            if detections and self._main not in tracks:
                self._main = tracks[0]  # detections come largest first
            chosen = [(0, tracks.index(self._main), self._main)] if detections else []
        else:
            chosen = [(track, i, track) for i, track in enumerate(tracks)]
        runs, out = {}, []
        for face_id, i, track in chosen:
            if track in self._runs:
                runs[track] = self._runs[track]
            else:
                runs[track], self._next_segment = self._next_segment, self._next_segment + 1
            out.append(TrackedFace(face_id, runs[track], detections[i]))
        self._runs = runs
        return sorted(out, key=lambda f: f.face_id)

    def _match(self, detections: list[FaceDetection]) -> list[int]:
        """Track id for each detection: best IoU first, new ids for the unmatched."""
        live = {t: box for t, (frame, box) in self._last.items() if self._frame - frame <= self.memory}
        pairs = sorted(
            (
                (box_iou(box, d.box), t, i)
                for t, box in live.items()
                for i, d in enumerate(detections)
            ),
            reverse=True,
        )
        assigned: dict[int, int] = {}
        used: set[int] = set()
        for iou, track, i in pairs:
            if iou < self.min_iou:
                break
            if i not in assigned and track not in used:
                assigned[i] = track
                used.add(track)
        ids = []
        for i, detection in enumerate(detections):
            if i not in assigned:
                assigned[i], self._next_track = self._next_track, self._next_track + 1
            ids.append(assigned[i])
            self._last[assigned[i]] = (self._frame, detection.box)
        self._last = {t: v for t, v in self._last.items() if self._frame - v[0] <= self.memory}
        return ids
