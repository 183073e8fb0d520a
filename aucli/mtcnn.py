"""MTCNN (Zhang et al., 2016) run by aucli with the weights facenet-pytorch ships.

Two ways in:

* ``detect``: the full cascade on whole frames (image pyramid -> P-Net ->
  R-Net -> O-Net), the computation facenet-pytorch's ``MTCNN.detect`` does,
  step for step and with its thresholds, so boxes and landmarks agree with it
  to float rounding.
* ``refine``: O-Net alone, on square boxes placed where faces are expected
  (``faces.FaceFollower`` places them from the previous frame's landmarks and
  decides when a full detection is due). One 48x48 network instead of the
  pyramid.

The three networks are defined here with facenet-pytorch's layer names, and
their weight files are read from its package folder without importing the
package: importing it imports torchvision, and with it torch._dynamo, seconds of
start-up that ``aucli detect`` does not need.

Boxes are x1, y1, x2, y2 in source pixels; landmarks (5, 2) x, y: left eye,
right eye, nose, left and right mouth corner.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import AucliError

THRESHOLDS = (0.6, 0.7, 0.7)  # P-, R-, O-Net score thresholds (facenet-pytorch's defaults)
PYRAMID_FACTOR = 0.709


def area_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) float -> (..., h, w) by area averaging: the values of
    ``F.interpolate(mode="area")`` (adaptive average pooling), computed as
    rows @ images @ columns. On the cascade's crops that measured about 3x
    faster than torch's pooling kernel (which facenet-pytorch uses) on one
    CPU thread."""
    rows = torch.from_numpy(_area_matrix(images.shape[-2], size[0])).to(images.device)
    cols = torch.from_numpy(_area_matrix(images.shape[-1], size[1])).to(images.device)
    return rows @ images @ cols.T


@lru_cache(maxsize=1024)
def _area_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in): output i averages inputs floor(i*n/m) .. ceil((i+1)*n/m) - 1."""
    matrix = np.zeros((size_out, size_in), np.float32)
    for i in range(size_out):
        lo, hi = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        matrix[i, lo:hi] = 1.0 / (hi - lo)
    return matrix


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels to the networks' input range, channels-last: torch's max pooling, a large
    part of these small networks, measured 4-20x faster in that layout on CPU."""
    return ((x - 127.5) * 0.0078125).contiguous(memory_format=torch.channels_last)


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes (n, >=4) grown to squares around their centres (the side: the longer one)."""
    boxes = boxes.clone()
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    boxes[:, 0] += w * 0.5 - side * 0.5
    boxes[:, 1] += h * 0.5 - side * 0.5
    boxes[:, 2] = boxes[:, 0] + side
    boxes[:, 3] = boxes[:, 1] + side
    return boxes


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply a network's box corrections, in units of the (inclusive) box size."""
    boxes = boxes.clone()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    boxes[:, :4] = boxes[:, :4] + offsets * torch.stack([w, h, w, h], dim=1)
    return boxes


def _nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, threshold: float,
         smaller: bool = False) -> np.ndarray:
    """Greedy non-maximum suppression within each group -> kept indices, best score first.

    ``smaller=False``: overlap = intersection over union with areas (x2-x1)(y2-y1),
    boxes overlapping a better one by more than ``threshold`` dropped, ties in
    score kept in input order: torchvision's ``batched_nms``, which the P- and
    R-Net stages use. ``smaller=True``: intersection over the smaller area with
    the +1 pixel convention, the O-Net stage's rule.
    """
    one = 1.0 if smaller else 0.0
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = (x2 - x1 + one) * (y2 - y1 + one)
    keep = []
    for group in np.unique(groups):
        idx = np.flatnonzero(groups == group)
        order = idx[np.argsort(-scores[idx], kind="stable")]
        while len(order):
            i, rest = order[0], order[1:]
            keep.append(i)
            w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
            h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
            inter = w * h
            overlap = inter / (np.minimum(area[i], area[rest]) if smaller else area[i] + area[rest] - inter)
            order = rest[overlap <= threshold]
    keep = np.array(keep, np.int64)
    return keep[np.argsort(-scores[keep], kind="stable")]


def _keep(boxes: torch.Tensor, owner: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of ``boxes`` (n, >=5: corners, score) that survive NMS within each image."""
    array = boxes[:, :5].cpu().numpy()
    keep = _nms(array[:, :4], array[:, 4], owner.cpu().numpy(), threshold)
    return torch.from_numpy(keep).to(boxes.device)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    # The weights come from Caffe/TensorFlow: dense layers read the map width-major.
    return x.permute(0, 3, 2, 1).reshape(x.shape[0], -1)


class PNet(nn.Module):
    """Proposal network: fully convolutional, a face score and box offsets per 12x12 cell."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)  # offsets, scores


class RNet(nn.Module):
    """Refinement network on 24x24 crops: a face score and box offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu4(self.dense4(_flatten(self.prelu3(self.conv3(x)))))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)  # offsets, scores


class ONet(nn.Module):
    """Output network on 48x48 crops: a face score, box offsets and 5 landmarks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu5(self.dense5(_flatten(self.prelu4(self.conv4(x)))))
        # offsets, landmarks (5 x, then 5 y, as fractions of the box), scores
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


def weights_folder() -> Path:
    """facenet-pytorch's folder of MTCNN weights (pnet.pt, rnet.pt, onet.pt), found without importing it."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise AucliError("facenet-pytorch is not installed; it provides the MTCNN face-detector weights")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


class MTCNN(nn.Module):
    """P-, R- and O-Net with facenet-pytorch's weights (shipped inside that package)."""

    def __init__(self, device: str | torch.device = "cpu", min_face_size: int = 40) -> None:
        super().__init__()
        self.pnet, self.rnet, self.onet = PNet(), RNet(), ONet()
        folder = weights_folder()
        for name in ("pnet", "rnet", "onet"):
            path = folder / f"{name}.pt"
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except (OSError, RuntimeError) as error:
                raise AucliError(f"{path}: cannot read the MTCNN weights ({error})") from None
            getattr(self, name).load_state_dict(state)
        self.min_face_size = min_face_size
        self.device = torch.device(device)
        self.to(self.device, memory_format=torch.channels_last).eval()

    # ----- the full cascade -----------------------------------------------------------
    @torch.inference_mode()
    def detect(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(B, H, W, 3) uint8 RGB -> per image: boxes (n, 5) x1 y1 x2 y2 score, landmarks
        (n, 5, 2), and the square boxes O-Net looked at (n, 4)."""
        images = np.ascontiguousarray(images)
        boxes, owner = self._propose(_to_batch(images, self.device))
        if len(boxes):
            boxes, owner = self._refine_candidates(images, boxes, owner)
        boxes, landmarks, seen, kept = self._landmarks(images, boxes, owner)
        owner = owner.cpu().numpy()[kept]
        return [(boxes[owner == b], landmarks[owner == b], seen[owner == b]) for b in range(len(images))]

    def _scales(self, height: int, width: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        side = min(height, width) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= PYRAMID_FACTOR
            side *= PYRAMID_FACTOR
        return scales

    def _propose(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the image pyramid -> candidate boxes (n, 5), squared, and their image."""
        height, width = batch.shape[-2:]
        found, owners = [], []
        # Whole frames: torch's pooling (a matrix product would cost more here), on a
        # contiguous copy: on the channels-last view of the decoded pixels the pyramid of a
        # 640x360 frame took 7-11 ms instead of 4.4 (same values, one thread).
        batch = batch.contiguous()
        for scale in self._scales(height, width):
            level = F.interpolate(batch, size=(int(height * scale + 1), int(width * scale + 1)), mode="area")
            offsets, probs = self.pnet(_normalise(level))
            hits = (probs[:, 1] >= THRESHOLDS[0]).nonzero()  # (n, 3): image, y, x of 12x12 cells
            owner = hits[:, 0]
            score = probs[:, 1][hits[:, 0], hits[:, 1], hits[:, 2]]
            offset = offsets.permute(0, 2, 3, 1)[hits[:, 0], hits[:, 1], hits[:, 2]]  # (n, 4)
            cell = hits[:, 1:].flip(1).to(batch.dtype)  # x, y
            top_left = ((2 * cell + 1) / scale).floor()
            bottom_right = ((2 * cell + 12) / scale).floor()
            boxes = torch.cat([top_left, bottom_right, score[:, None], offset], dim=1)
            keep = _keep(boxes, owner, 0.5)
            found.append(boxes[keep])
            owners.append(owner[keep])
        if not found:  # the image is smaller than the smallest face looked for
            return batch.new_zeros(0, 5), torch.zeros(0, dtype=torch.long, device=batch.device)
        boxes, owner = torch.cat(found), torch.cat(owners)
        keep = _keep(boxes, owner, 0.7)
        boxes, owner = boxes[keep], owner[keep]
        # P-Net's corrections are in units of the exclusive box size, unlike the later stages'.
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        corrected = boxes[:, :4] + boxes[:, 5:9] * torch.stack([w, h, w, h], dim=1)
        return _square(torch.cat([corrected, boxes[:, 4:5]], dim=1)), owner

    def _crops(self, images: np.ndarray, boxes: torch.Tensor, owner: torch.Tensor, size: int):
        """Normalised (n, 3, size, size) crops of the boxes (cut to the image), and which boxes had one.

        Crops are cut from the uint8 images, so only their pixels are converted to float.
        """
        height, width = images.shape[1:3]
        corners = boxes[:, :4].trunc().int().cpu().numpy()
        x1, y1 = np.maximum(corners[:, 0], 1), np.maximum(corners[:, 1], 1)
        x2, y2 = np.minimum(corners[:, 2], width), np.minimum(corners[:, 3], height)
        valid = (y2 > y1 - 1) & (x2 > x1 - 1)
        owner = owner.cpu().numpy()
        crops = [
            area_resize(_to_batch(images[owner[i], y1[i] - 1 : y2[i], x1[i] - 1 : x2[i]][None], self.device)[0],
                        (size, size))
            for i in np.flatnonzero(valid)
        ]
        stacked = torch.stack(crops) if crops else boxes.new_zeros(0, 3, size, size)
        return _normalise(stacked), torch.from_numpy(valid).to(boxes.device)

    def _refine_candidates(self, images, boxes, owner) -> tuple[torch.Tensor, torch.Tensor]:
        """R-Net: keep the candidates it scores as faces, corrected and squared."""
        crops, valid = self._crops(images, boxes, owner, 24)
        boxes, owner = boxes[valid], owner[valid]
        offsets, probs = self.rnet(crops) if len(crops) else (crops.new_zeros(0, 4), crops.new_zeros(0, 2))
        passed = probs[:, 1] > THRESHOLDS[1]
        boxes = torch.cat([boxes[passed, :4], probs[passed, 1:2]], dim=1)
        offsets, owner = offsets[passed], owner[passed]
        keep = _keep(boxes, owner, 0.7)
        return _square(_regress(boxes[keep], offsets[keep])), owner[keep]

    def _landmarks(self, images, boxes, owner) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """O-Net on square boxes -> final boxes (m, 5), landmarks (m, 5, 2), the boxes O-Net
        saw (m, 4), and which of the n input boxes these are (indices)."""
        index = torch.arange(len(boxes), device=boxes.device)
        if len(boxes):
            crops, valid = self._crops(images, boxes, owner, 48)
            boxes, owner, index = boxes[valid], owner[valid], index[valid]
        if not len(boxes):
            return np.zeros((0, 5), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0, 4), np.float32), \
                np.zeros(0, np.int64)
        offsets, points, probs = self.onet(crops)
        passed = probs[:, 1] > THRESHOLDS[2]
        seen = boxes[passed, :4]
        boxes = torch.cat([seen, probs[passed, 1:2]], dim=1)
        offsets, points, owner, index = offsets[passed], points[passed], owner[passed], index[passed]
        # Landmarks are fractions of the box O-Net saw (inclusive size, 1-based origin).
        w = (seen[:, 2] - seen[:, 0] + 1)[:, None]
        h = (seen[:, 3] - seen[:, 1] + 1)[:, None]
        landmarks = torch.stack([w * points[:, :5] + seen[:, 0:1] - 1, h * points[:, 5:] + seen[:, 1:2] - 1], dim=2)
        boxes = _regress(boxes, offsets).cpu().numpy()
        keep = _nms(boxes[:, :4], boxes[:, 4], owner.cpu().numpy(), 0.7, smaller=True)
        return boxes[keep], landmarks.cpu().numpy()[keep], seen.cpu().numpy()[keep], index.cpu().numpy()[keep]

    # ----- following known faces ------------------------------------------------------
    @torch.inference_mode()
    def refine(self, image: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """O-Net alone on given square boxes (n, 4) of one (H, W, 3) image -> boxes (m, 5),
        landmarks (m, 5, 2) of the faces it confirms, and which input boxes they came from (m,)."""
        boxes = torch.as_tensor(np.asarray(squares, np.float32).reshape(-1, 4), device=self.device)
        owner = torch.zeros(len(boxes), dtype=torch.long, device=self.device)
        boxes, landmarks, _, index = self._landmarks(np.ascontiguousarray(image[None]), boxes, owner)
        return boxes, landmarks, index


def _to_batch(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
