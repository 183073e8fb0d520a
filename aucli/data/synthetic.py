"""Synthetic AU data: real faces from the sample media with AU-like motions rendered over time.

Each subject is one aligned face from ``sample_videos/`` (optionally with a
deterministic change of appearance). Each of its videos is a timeline of
expression events: a prototype such as a smile (AU6 + AU12, often AU7/AU10)
or a frown (AU4 + AU7 + AU23), with onset, apex and offset; two streams of
events overlap. Every AU is a local warp of its facial region plus shading (a
crisp wrinkle or dimple inside a broad, heavy shadow, so that a tiny network
learns it in CPU minutes), scaled by its intensity; it is labelled present
where the intensity reaches 0.5. Some frames are labelled 9 (unknown), as in
raw BP4D codes.

The result is written in the standard layout (``aucli.data.layout``), so
training and evaluation on it run exactly the code real data uses. Folds are
subject-independent by person: all subjects made from one person share a part.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from ..aus import get_au_set
from ..errors import AucliError
from .layout import FORMATS, fold_subjects, write_split

FORMAT = FORMATS["synthetic"]
# The repository's sample media (see sample_videos/PROVENANCE.md); override for installed copies.
SAMPLE_MEDIA = Path(os.environ.get("AUCLI_SAMPLE_MEDIA", Path(__file__).resolve().parents[2] / "sample_videos"))

# Source faces: (file under sample_videos, frame index or None for an image, person).
SOURCES = (
    ("videos/WolfgangLanger_Pexels.mp4", 0, "woman"),
    ("videos/WolfgangLanger_Pexels.mp4", 300, "woman"),
    ("videos/single_face.mp4", 0, "man"),
    ("images/single_face.jpg", None, "man"),  # may be the same man: kept in the same part
    ("images/multi_face.jpg", None, "group"),  # five people, one person each (left to right)
)

# What each AU does, in units of the eye distance e, from an anchor ("eye" = between
# the eyes, "mouth" = between the mouth corners); +a is image-right, +b is down.
# move: (anchor, a, b, da, db, radius), mirrored to -a when a != 0.
# shade: (anchor, a0, b0, a1, b1, strength): a darkened line (a spot when the ends
# coincide), mirrored likewise; negative strength lightens.
AU_ACTIONS: dict[int, dict[str, list[tuple]]] = {
    1: {"move": [("eye", 0.18, -0.42, 0.0, -0.2, 0.17)],  # inner brows up, central forehead lines
        "shade": [("eye", -0.3, -0.78, 0.3, -0.78, 0.6), ("eye", -0.22, -0.92, 0.22, -0.92, 0.5)]},
    2: {"move": [("eye", 0.62, -0.38, 0.03, -0.2, 0.2)],  # outer brows up, lateral forehead lines
        "shade": [("eye", 0.35, -0.8, 0.75, -0.7, 0.6)]},
    4: {"move": [("eye", 0.3, -0.4, -0.08, 0.14, 0.2)],  # brows down and together, glabella furrows
        "shade": [("eye", 0.07, -0.5, 0.05, -0.2, 0.7)]},
    6: {"move": [("eye", 0.5, 0.5, 0.0, -0.14, 0.28)],  # cheeks up, crow's feet
        "shade": [("eye", 0.8, -0.05, 0.97, -0.14, 0.6), ("eye", 0.82, 0.03, 1.0, 0.03, 0.6),
                  ("eye", 0.8, 0.1, 0.97, 0.2, 0.6)]},
    7: {"move": [("eye", 0.5, 0.13, 0.0, -0.09, 0.12), ("eye", 0.5, -0.12, 0.0, 0.05, 0.1)],  # lids tighten
        "shade": [("eye", 0.32, 0.16, 0.68, 0.16, 0.5)]},
    10: {"move": [("mouth", 0.15, -0.2, 0.0, -0.13, 0.17)],  # upper lip up, deep upper nasolabial folds
         "shade": [("mouth", 0.2, -0.6, 0.35, -0.3, 0.7)]},
    12: {"move": [("mouth", 0.4, 0.0, 0.1, -0.15, 0.16)],  # corners up and out, lower nasolabial folds
         "shade": [("mouth", 0.38, -0.35, 0.58, -0.02, 0.6)]},
    14: {"move": [("mouth", 0.4, 0.0, -0.07, 0.0, 0.12)],  # corners in, dimples
         "shade": [("mouth", 0.55, 0.02, 0.55, 0.02, 0.8)]},
    15: {"move": [("mouth", 0.4, 0.02, 0.0, 0.16, 0.15)],  # corners down, lines below them
         "shade": [("mouth", 0.42, 0.12, 0.5, 0.35, 0.6)]},
    17: {"move": [("mouth", 0.0, 0.5, 0.0, -0.15, 0.28), ("mouth", 0.0, 0.15, 0.0, -0.07, 0.15)],
         "shade": [("mouth", 0.1, 0.5, 0.1, 0.5, 0.6), ("mouth", 0.0, 0.6, 0.0, 0.6, 0.6)]},  # chin up, dimpling
    23: {"move": [("mouth", 0.38, 0.0, -0.08, 0.0, 0.12), ("mouth", 0.0, -0.1, 0.0, 0.04, 0.12),
                  ("mouth", 0.0, 0.1, 0.0, -0.04, 0.12)],  # lips narrow, a tight dark lip line
         "shade": [("mouth", -0.3, 0.0, 0.3, 0.0, 0.6)]},
    24: {"move": [("mouth", 0.0, -0.25, 0.0, 0.1, 0.18), ("mouth", 0.0, 0.25, 0.0, -0.1, 0.18)],
         "shade": [("mouth", 0.0, -0.2, 0.0, -0.2, -0.5), ("mouth", 0.0, 0.22, 0.0, 0.22, -0.5)]},  # pressed, pale
}

# Expression prototypes: (AUs that define it, AUs that often join it, relative frequency).
PROTOTYPES = (
    ((6, 12), (7, 10, 14), 3.0),  # felt smile
    ((12,), (14,), 1.5),  # polite smile
    ((1, 2), (), 1.5),  # surprise
    ((1, 4, 15), (17,), 1.0),  # sadness
    ((15, 17), (1, 23), 1.0),  # pout
    ((4, 7, 23), (24, 17), 1.5),  # anger
    ((4, 10), (7, 17), 1.0),  # disgust
    ((17, 24), (23,), 1.0),  # lip press
    ((14,), (17, 24), 1.0),  # dimpler
    ((6, 7), (4,), 1.0),  # squint
)


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything the generated data depends on; its hash names the cache folder."""

    seed: int = 0
    variants: int = 2  # appearance variants per source face
    videos_per_subject: int = 3
    frames_per_video: int = 48
    version: int = 3  # bump when rendering changes

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def default_root(spec: SyntheticSpec) -> Path:
    cache = Path(os.environ.get("AUCLI_CACHE_DIR", Path.home() / ".cache" / "aucli"))
    return cache / "synthetic" / spec.key()


def ensure_synthetic(root: str | Path | None = None, spec: SyntheticSpec | None = None,
                     quiet: bool = True) -> Path:
    """The synthetic layout at `root` (default: a cache folder named by the spec), generated if absent."""
    spec = spec or SyntheticSpec()
    root = Path(root) if root else default_root(spec)
    if (root / "synthetic.json").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise AucliError(f"{root}: exists but holds no synthetic dataset; choose an empty or new folder")
    tmp = root.with_name(f".{root.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp, spec, quiet=quiet)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()
    try:
        tmp.rename(root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ----- source faces ---------------------------------------------------------------------------


@dataclass
class SourceFace:
    person: str
    image: np.ndarray  # (256, 256, 3) uint8 aligned crop
    landmarks: np.ndarray  # (5, 2) in crop coordinates


def source_faces() -> list[SourceFace]:
    """Detect and align the faces of the sample media with the functions `detect` uses."""
    from ..faces import TEMPLATE, FaceDetector, align_face, similarity_transform
    from ..video import open_video

    images, people = [], []
    for name, frame, person in SOURCES:
        path = SAMPLE_MEDIA / name
        if not path.is_file():
            raise AucliError(f"{path}: sample media for synthetic data not found (set AUCLI_SAMPLE_MEDIA)")
        if frame is None:
            images.append(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
        else:
            with open_video(path) as reader:
                images.append(next(f.image for f in reader if f.index == frame))
        people.append(person)
    faces = []
    for image, person, found in zip(images, people, FaceDetector("cpu").detect(images)):
        if person == "group":
            found = sorted(found, key=lambda f: f.box[0])  # left to right: a fixed order
        else:
            found = found[:1]
        for i, det in enumerate(found):
            crop = align_face(image, det.landmarks)
            matrix = similarity_transform(det.landmarks, TEMPLATE)
            marks = np.c_[det.landmarks, np.ones(5)] @ matrix.T
            faces.append(SourceFace(f"{person}{i}" if person == "group" else person, crop, marks))
    if not faces:
        raise AucliError("no face found in the sample media")
    return faces


def appearance_variant(face: SourceFace, variant: int, rng: np.random.Generator) -> SourceFace:
    """Variant 0 is the face as is; others are mirrored (odd) and recoloured, a new 'subject'."""
    if variant == 0:
        return face
    image, marks = face.image.astype(np.float32), face.landmarks.copy()
    if variant % 2 == 1:
        image = image[:, ::-1]
        marks[:, 0] = image.shape[1] - 1 - marks[:, 0]
        marks = marks[[1, 0, 2, 4, 3]]  # left/right swap places
    gain = rng.uniform(0.8, 1.2, size=3)  # white balance
    gamma = rng.uniform(0.8, 1.25)
    image = 255.0 * (np.clip(image * gain, 0, 255) / 255.0) ** gamma
    return SourceFace(face.person, np.clip(image, 0, 255).astype(np.uint8), marks)


# ----- rendering --------------------------------------------------------------------------------


class FaceRig:
    """Per-AU displacement fields and shading masks of one face at full intensity."""

    def __init__(self, face: SourceFace, aus: tuple[int, ...]) -> None:
        self.face = face
        self.aus = aus
        size = face.image.shape[0]
        le, re, _, lm, rm = face.landmarks
        self.e = float(np.linalg.norm(re - le))
        right = (re - le) / self.e
        down = np.array([-right[1], right[0]])
        self.axes = np.stack([right, down])  # (2, 2): face axes in image coordinates
        self.anchors = {"eye": (le + re) / 2, "mouth": (lm + rm) / 2}
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        self.grid = np.stack([xs, ys], -1)  # (H, W, 2)
        self.fields = np.stack([self._field(AU_ACTIONS[au]["move"]) for au in aus])  # (N, H, W, 2)
        self.shades = np.stack([self._shade(AU_ACTIONS[au]["shade"]) for au in aus])  # (N, H, W)

    def point(self, anchor: str, a: float, b: float) -> np.ndarray:
        return self.anchors[anchor] + self.e * (a * self.axes[0] + b * self.axes[1])

    def _field(self, moves: list[tuple]) -> np.ndarray:
        field = np.zeros_like(self.grid)
        for anchor, a, b, da, db, radius in moves:
            for sign in (1, -1) if a != 0 else (1,):
                centre = self.point(anchor, sign * a, b)
                shift = self.e * (sign * da * self.axes[0] + db * self.axes[1])
                d2 = ((self.grid - centre) ** 2).sum(-1)
                field += np.exp(-d2 / (2 * (radius * self.e) ** 2))[..., None] * shift
        return field

    def _shade(self, lines: list[tuple]) -> np.ndarray:
        """A crisp wrinkle (line or spot) inside a broad soft shadow of the same shape.

        The broad part is what a small network trained for a few CPU minutes picks up;
        the crisp part is what makes it look like a wrinkle.
        """
        mask = np.zeros(self.grid.shape[:2], np.float32)
        for anchor, a0, b0, a1, b1, strength in lines:
            mirror = a0 * a1 >= 0 and (a0, a1) != (0, 0)  # lines across the midline are drawn once
            for sign in (1, -1) if mirror else (1,):
                p0 = tuple(int(v) for v in self.point(anchor, sign * a0, b0).round())
                p1 = tuple(int(v) for v in self.point(anchor, sign * a1, b1).round())
                for width, blur, share in ((3, 1.5, 1.0), (int(0.35 * self.e), 0.12 * self.e, 1.0)):
                    layer = np.zeros_like(mask)
                    if p0 == p1:
                        cv2.circle(layer, p0, max(3, int(0.06 * self.e)) + width // 2, 1.0, -1)
                    else:
                        cv2.line(layer, p0, p1, 1.0, width)
                    layer = cv2.GaussianBlur(layer, (0, 0), blur)
                    mask += share * strength * layer / max(float(layer.max()), 1e-6)
        return mask

    def render(self, intensity: np.ndarray, jitter: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """intensity (N,) in [0,1], jitter (dx, dy, degrees) -> (H, W, 3) uint8."""
        shade = np.zeros(self.shades.shape[1:], np.float32)  # (H, W)
        field = np.zeros(self.fields.shape[1:], np.float32)  # (H, W, 2)
        for i in np.flatnonzero(intensity > 1e-3):  # most AUs rest in most frames
            shade += np.float32(intensity[i]) * self.shades[i]
            field += np.float32(intensity[i]) * self.fields[i]
        image = self.face.image.astype(np.float32) * np.clip(1 - shade, 0.3, 1.5)[..., None]
        size = image.shape[0]
        rot = cv2.getRotationMatrix2D((size / 2, size / 2), float(jitter[2]), 1.0)
        rot[:, 2] += jitter[:2]
        src = self.grid @ rot[:, :2].T + rot[:, 2] - field  # backward map: where each pixel comes from
        out = cv2.remap(image, src[..., 0].astype(np.float32), src[..., 1].astype(np.float32),
                        cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out += 2.0 * rng.standard_normal(out.shape, dtype=np.float32)  # sensor noise
        return np.clip(out, 0, 255).astype(np.uint8)


def timeline(aus: tuple[int, ...], frames: int, rng: np.random.Generator,
             streams: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Intensities (F, N) of overlapping streams of expression events, and labels (F, N) with a few 9s."""
    col = {au: i for i, au in enumerate(aus)}
    intensity = np.zeros((frames, len(aus)))
    freq = np.array([p[2] for p in PROTOTYPES])
    for _ in range(streams):  # expressions overlap and blend, as in spontaneous data
        t = int(rng.integers(-4, 8))
        while t < frames:
            core, often, _ = PROTOTYPES[rng.choice(len(PROTOTYPES), p=freq / freq.sum())]
            members = [au for au in core if rng.random() > 0.1] or [core[0]]
            members += [au for au in often if rng.random() < 0.5]
            if rng.random() < 0.15:
                members.append(int(rng.choice(aus)))
            subtle = rng.random() < 0.1  # visible but below the coding threshold
            onset, apex, offset = int(rng.integers(3, 9)), int(rng.integers(6, 21)), int(rng.integers(3, 9))
            env = np.concatenate([np.linspace(0, 1, onset + 1)[1:], np.ones(apex), np.linspace(1, 0, offset + 1)[1:]])
            env = env * env * (3 - 2 * env)  # smooth onset and offset
            for au in set(members):
                amp = rng.uniform(0.15, 0.35) if subtle else rng.uniform(0.65, 1.0)
                lag = int(rng.integers(0, 3))  # AUs of one event do not start on the same frame
                span = np.arange(max(t + lag, 0), min(t + lag + len(env), frames))
                intensity[span, col[au]] = np.maximum(intensity[span, col[au]], amp * env[span - t - lag])
            t += onset + apex + offset + int(rng.integers(-2, 9))
    labels = (intensity >= 0.5).astype(np.int64)
    if rng.random() < 0.3:  # a stretch left uncoded for one AU
        start, length = int(rng.integers(0, frames)), int(rng.integers(3, 11))
        labels[start : start + length, int(rng.integers(0, len(aus)))] = 9
    return intensity, labels


def head_motion(frames: int, rng: np.random.Generator) -> np.ndarray:
    """Slow, small (dx, dy, degrees) per frame, as left over after face alignment."""
    steps = rng.normal(0, [0.6, 0.6, 0.3], size=(frames, 3))
    out = np.zeros((frames, 3))
    for i in range(frames):
        out[i] = (0.85 * out[i - 1] if i else 0) + steps[i]
    return out


def assign_parts(people: list[str], sizes: dict[str, int]) -> list[list[str]]:
    """Three parts of people, largest first into the smallest part, so folds split by person."""
    parts: list[list[str]] = [[], [], []]
    load = [0, 0, 0]
    for person in sorted(dict.fromkeys(people), key=lambda p: (-sizes[p], people.index(p))):
        i = int(np.argmin(load))
        parts[i].append(person)
        load[i] += sizes[person]
    return parts


def generate(root: Path, spec: SyntheticSpec, quiet: bool = True) -> None:
    """Render every subject's videos into `root` and write the lists of the three folds."""
    aus = get_au_set(FORMAT.au_set).aus
    faces = source_faces()
    rng = np.random.default_rng(spec.seed)
    subjects: list[tuple[str, SourceFace]] = []
    for face in faces:
        for v in range(spec.variants):
            subjects.append((f"S{len(subjects) + 1:02d}", appearance_variant(face, v, rng)))
    rows: dict[str, list[tuple[str, np.ndarray]]] = {}
    for name, face in subjects:
        rig = FaceRig(face, aus)
        subject_rng = np.random.default_rng([spec.seed, int(name[1:])])
        for video in range(1, spec.videos_per_subject + 1):
            folder = root / FORMAT.images / name / f"T{video}"
            folder.mkdir(parents=True, exist_ok=True)
            intensity, labels = timeline(aus, spec.frames_per_video, subject_rng)
            motion = head_motion(spec.frames_per_video, subject_rng)
            for i in range(spec.frames_per_video):
                image = rig.render(intensity[i], motion[i], subject_rng)
                cv2.imwrite(str(folder / f"{i + 1}{FORMAT.image_ext}"), image[..., ::-1],
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
                rows.setdefault(name, []).append((f"{name}/T{video}/{i + 1}{FORMAT.image_ext}", labels[i]))
        if not quiet:
            print(f"synthetic: {name} ({face.person}) rendered", flush=True)
    person_of = {name: face.person for name, face in subjects}
    sizes = {p: sum(1 for n in person_of if person_of[n] == p) for p in person_of.values()}
    people_parts = assign_parts(list(person_of.values()), sizes)
    parts = [[n for n in person_of if person_of[n] in part] for part in people_parts]
    for fold in (1, 2, 3):
        for split, names in zip(("train", "test"), fold_subjects(parts, fold)):
            items = [row for n in names for row in rows[n]]
            write_split(root, FORMAT, split, fold, [p for p, _ in items], np.stack([lab for _, lab in items]))
    meta = {"spec": asdict(spec), "parts": parts, "people": person_of,
            "sources": [list(map(str, s)) for s in SOURCES]}
    (root / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
