"""Sliding-window inference over track segments: backbone once per frame,
MFD projection once per pair of neighbouring frames, the temporal head per window.

The window rule (one rule, fixed by the segment alone, so results do not depend
on batch size or on how frames arrive):

* T = the checkpoint's clip length, k = MFD's pooling half-window, r = the
  TCN's half-kernel (2). A frame at window position p depends on window
  positions p-k-r .. p+k+r only, so at the "clean" positions p in
  [k+r, T-1-k-r] its output does not depend on where the window sits.
* Frames are predicted in groups of S = max(1, T - 2(k+r)) consecutive frames
  (S = 2 for T=16, k=5). Group g covers segment frames gS .. gS+S-1 and its
  window starts at gS - c, c = (T - S) // 2, so the group sits at the window's
  centre (positions c .. c+S-1, the clean positions when there are any).
* Window positions before the segment's first frame or after its last one
  repeat that first or last aligned face: the paper's border rule (spec §9.1
  #4). A face repeated next to itself has zero difference, exactly as when
  the model is run on the padded clip.

So every frame is predicted at the centre of a T-frame window, with all the
real context the segment has within T/2 frames on either side.

Speed: when clean positions exist, consecutive groups share one longer window
(the union of their T-windows, about 4T frames). Each group still sits at clean
positions, so its output equals that of its own T-window, while the head runs
about 1.2 times per frame instead of T/S times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import numpy as np
import torch

from .model.temporal import TCN_KERNEL


def window_layout(clip_length: int, k: int) -> tuple[int, int]:
    """(S, c): frames predicted per window and the window position of the first of them."""
    stride = max(1, clip_length - 2 * _reach(k))
    return stride, (clip_length - stride) // 2


def window_positions(frame: int, length: int, clip_length: int, k: int) -> tuple[list[int], int]:
    """Segment indices of the T-window that predicts ``frame`` (borders repeated),
    and ``frame``'s position in it. ``length`` = the segment's number of frames."""
    stride, centre = window_layout(clip_length, k)
    start = (frame // stride) * stride - centre
    indices = [min(max(start + p, 0), length - 1) for p in range(clip_length)]
    return indices, frame - start


def _reach(k: int) -> int:
    """How far a frame's output looks to either side: MFD pooling, then the TCN."""
    return k + TCN_KERNEL // 2


@dataclass
class _Segment:
    """Per-segment ring buffer: codes are dropped once no later window needs them."""

    static: dict[int, torch.Tensor] = field(default_factory=dict)  # index -> (49, d)
    motion: dict[int, torch.Tensor] = field(default_factory=dict)  # i -> pair (i, i+1), (4, C, 7, 7)
    keys: dict[int, Hashable] = field(default_factory=dict)
    last_maps: list[torch.Tensor] | None = None
    received: int = 0  # faces added
    encoded: int = 0  # faces through the backbone
    next_group: int = 0  # groups queued for the head
    done_group: int = 0  # groups through the head (queued jobs run in order)
    ended: bool = False


class WindowPredictor:
    """Feed aligned faces segment by segment; collect per-frame AU probabilities.

    ``add`` queues a face; ``end`` says a segment has no more faces; ``flush``
    computes everything still pending. ``pop_results`` returns ``(key, probs)``
    for finished frames, probs a (N,) float array.

    ``frame_features(frames, final_map) -> (M, D)``, if given, runs on each backbone
    batch (model inputs and the backbone's final map); ``features`` maps each key to
    its (D,) row (the calibration head's inputs, aucli/calibration.py).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        clip_length: int,
        preprocess: Callable[[np.ndarray], torch.Tensor],
        batch_size: int = 16,
        device: torch.device | str = "cpu",
        frame_features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        self.frame_features = frame_features
        self.features: dict[Hashable, np.ndarray] = {}
        self.clip_length = clip_length
        self.preprocess = preprocess
        self.batch_size = max(1, batch_size)
        self.device = torch.device(device)
        self.stride, self.centre = window_layout(clip_length, model.k)
        if clip_length > 2 * _reach(model.k):
            # Clean positions exist: several groups share one longer window. About 4T
            # frames per window: the head runs on 78 positions to predict 64 frames
            # (T=16, k=5), against 46 for 32 with 2T.
            self.groups_per_job = math.ceil(max(self.batch_size, 4 * clip_length) / self.stride)
            self.jobs_per_batch = 1
        else:
            self.groups_per_job = 1
            self.jobs_per_batch = self.batch_size
        self._segments: dict[Hashable, _Segment] = {}
        self._faces: list[tuple[Hashable, np.ndarray]] = []  # waiting for the backbone
        self._jobs: list[tuple[Hashable, int, int]] = []  # (segment, first group, groups) for the head
        self._results: list[tuple[Hashable, np.ndarray]] = []
        self._still: torch.Tensor | None = None  # motion of a face against itself

    # ----- feeding -------------------------------------------------------------
    def add(self, segment: Hashable, key: Hashable, face: np.ndarray) -> None:
        seg = self._segments.setdefault(segment, _Segment())
        seg.keys[seg.received] = key
        seg.received += 1
        self._faces.append((segment, face))
        if len(self._faces) >= self.batch_size:
            self._encode()

    def end(self, segment: Hashable) -> None:
        if segment in self._segments:
            self._segments[segment].ended = True
            self._queue_jobs(segment)

    def flush(self) -> None:
        self._encode()
        for segment in list(self._segments):
            self.end(segment)
        self._run_jobs(force=True)

    def pop_results(self) -> list[tuple[Hashable, np.ndarray]]:
        results, self._results = self._results, []
        return results

    # ----- backbone and motion, once per frame / pair ----------------------------
    @torch.inference_mode()
    def _encode(self) -> None:
        if not self._faces:
            return
        batch = self.preprocess(np.stack([face for _, face in self._faces])).to(self.device)
        codes = self.model.encode_frames(batch)
        extra = None
        if self.frame_features is not None:
            extra = self.frame_features(batch, codes.maps[-1]).float().numpy()
        prev_maps: list[list[torch.Tensor]] = [[] for _ in codes.maps]
        next_maps: list[list[torch.Tensor]] = [[] for _ in codes.maps]
        pairs: list[tuple[_Segment, int]] = []
        for row, (segment, _) in enumerate(self._faces):
            seg = self._segments[segment]
            maps = [m[row : row + 1] for m in codes.maps]
            if seg.last_maps is not None:
                for scale, (a, b) in enumerate(zip(seg.last_maps, maps)):
                    prev_maps[scale].append(a)
                    next_maps[scale].append(b)
                pairs.append((seg, seg.encoded - 1))
            if self._still is None:
                self._still = self.model.encode_motion(maps, maps)[0]
            if extra is not None:
                self.features[seg.keys[seg.encoded]] = extra[row]
            seg.static[seg.encoded] = codes.static[row]
            seg.last_maps = maps
            seg.encoded += 1
        if pairs:
            motion = self.model.encode_motion(
                [torch.cat(p) for p in prev_maps], [torch.cat(n) for n in next_maps]
            )
            for (seg, index), m in zip(pairs, motion):
                seg.motion[index] = m
        segments = {segment for segment, _ in self._faces}
        self._faces = []
        for segment in segments:
            self._queue_jobs(segment)
        self._run_jobs()

    # ----- windows -------------------------------------------------------------
    def _queue_jobs(self, segment: Hashable) -> None:
        """Queue the segment's next groups whose window faces are all encoded."""
        seg = self._segments[segment]
        complete = seg.ended and seg.encoded == seg.received
        groups_total = math.ceil(seg.received / self.stride)
        while seg.next_group < groups_total:
            first = seg.next_group
            count = self.groups_per_job
            if complete:
                count = min(count, groups_total - first)
            elif (first + count - 1) * self.stride - self.centre + self.clip_length > seg.encoded:
                break  # the job's last window position is not encoded yet
            self._jobs.append((segment, first, count))
            seg.next_group += count
        if complete:
            seg.last_maps = None

    @torch.inference_mode()
    def _run_jobs(self, force: bool = False) -> None:
        while self._jobs and (force or len(self._jobs) >= self.jobs_per_batch):
            # One head call for jobs whose windows have the same length.
            count = self._jobs[0][2]
            batch = []
            while self._jobs and len(batch) < self.jobs_per_batch and self._jobs[0][2] == count:
                batch.append(self._jobs.pop(0))
            statics, motions, outputs = [], [], []
            for job in batch:
                static, motion, frames = self._gather(*job)
                statics.append(static)
                motions.append(motion)
                outputs.append(frames)
            if len(batch) == 1:  # one job (the usual case): no copy
                static, motion = statics[0][None], motions[0][None]
            else:
                static, motion = torch.stack(statics), torch.stack(motions)
            probs, _ = self.model.predict_window(static, motion)
            probs = probs.float().cpu().numpy()  # (B, W, N)
            for b, frames in enumerate(outputs):
                for position, key in frames:
                    self._results.append((key, probs[b, position]))
            for segment, _, count in batch:
                seg = self._segments.get(segment)
                if seg is not None:  # the segment's last job may already have evicted it
                    seg.done_group += count
                    self._evict(segment)

    def _gather(self, segment: Hashable, first: int, count: int):
        """Static (W, 49, d) and motion (W-1, 4, C, 7, 7) of the window shared by
        groups first .. first+count-1, borders repeated, and (position, key) of their frames."""
        seg = self._segments[segment]
        start = first * self.stride - self.centre
        length = (count - 1) * self.stride + self.clip_length
        # Queued windows never reach past the last encoded face unless the segment ended there.
        index = [min(max(start + p, 0), seg.encoded - 1) for p in range(length)]
        static = torch.stack([seg.static[i] for i in index])
        motion = torch.stack(
            [seg.motion[a] if b == a + 1 else self._still for a, b in zip(index, index[1:])]
        )
        frames = [
            (f - start, seg.keys.pop(f))
            for f in range(first * self.stride, (first + count) * self.stride)
            if f < seg.received
        ]
        return static, motion, frames

    def _evict(self, segment: Hashable) -> None:
        """Drop codes no later window of the segment reaches."""
        seg = self._segments[segment]
        if seg.ended and not seg.keys:
            del self._segments[segment]
            return
        keep_from = max(seg.done_group * self.stride - self.centre, 0)
        for table in (seg.static, seg.motion):
            for index in [i for i in table if i < keep_from]:
                del table[index]
