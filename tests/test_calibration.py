"""The per-video calibration head (aucli/calibration.py): features, fitting, storage, and its use
by `eval` and `detect`."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from aucli.calibration import (
    VideoHead, check_vote, fhog, fhog_dim, fit_head, group_medians, head_from_state, head_state, hog, hog_dim,
    tune_voted_thresholds, vote_decisions,
)
from aucli.checkpoint import load_checkpoint, load_model, save_with_video_head
from aucli.errors import AucliError
from media_fixtures import VIDEOS, tiny_checkpoint

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_hog_sees_edges_and_ignores_contrast():
    flat = torch.full((1, 3, 224, 224), 0.5)
    stripes = flat.clone()
    stripes[..., :, ::16] = 0.9  # vertical lines: horizontal gradients
    out = hog(_normalise(torch.cat([flat, stripes, 0.5 + 0.5 * (stripes - 0.5)])), MEAN, STD)
    assert out.shape == (3, hog_dim())
    assert out[0].abs().max() == 0  # no gradient, no votes
    cells = out[1].view(4, 9, 13, 13)  # (block corner, orientation bin, block row, block column)
    assert cells[:, 0].sum() > 10 * cells[:, 4].sum()  # 0-degree bin holds the votes, 90-degree none
    assert torch.allclose(out[1], out[2], atol=0.02)  # block normalisation: half the contrast, same HOG


def test_hog_halves_the_model_input_exactly_as_area_resizing_does():
    from aucli.calibration import _halve

    x = _normalise(torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(_halve(layout), torch.nn.functional.interpolate(x, size=112, mode="area"))
    # The same features as from faces area-resized first (the path of inputs of other sizes).
    resized = torch.nn.functional.interpolate(x, size=112, mode="area")
    assert torch.equal(hog(x, MEAN, STD), hog(resized, MEAN, STD))


def test_fhog_sees_edges_their_sign_and_ignores_contrast():
    flat = torch.full((1, 3, 224, 224), 0.5)
    rising = flat.clone()
    rising[..., :, 112:] = 0.8  # dark to bright, left to right, in the middle of the inner face
    falling = flat.clone()
    falling[..., :, :112] = 0.8
    faint = 0.5 + 0.5 * (rising - 0.5)
    coloured = flat.clone()
    coloured[:, 1, :, 112:] = 0.8  # the same edge in the green channel alone
    out = fhog(_normalise(torch.cat([flat, rising, falling, faint, coloured])), MEAN, STD)
    assert out.shape == (5, fhog_dim()) and fhog_dim() == 12 * 12 * 31
    assert out[0].abs().max() == 0  # no gradient (the de-normalisation's rounding is not one)
    cells = out.view(5, 12, 12, 31)
    edge = cells[1].sum((0, 1))
    assert edge[0] > 1 and edge[1:18].sum() == 0  # signed: 0 degrees only
    back = cells[2].sum((0, 1))
    assert back[9] > 1 and back[:9].sum() + back[10:18].sum() == 0  # the other sign: 180 degrees
    assert torch.allclose(edge[18:], back[18:], rtol=0.01, atol=0.01)  # unsigned and energy parts do not see the sign
    assert cells[1, :, 0].abs().max() == 0  # far from the edge (column 112 of 224 is the inner cells' middle)
    assert torch.allclose(out[1], out[3], atol=1e-3)  # block normalisation: half the contrast, same FHOG
    assert torch.allclose(out[1], out[4], atol=1e-3)  # the strongest channel's gradient, whichever it is


def test_group_medians_are_per_group(monkeypatch):
    import aucli.calibration as calibration

    x = np.array([[1.0], [3.0], [10.0], [2.0], [-5.0]])
    groups = np.array([0, 0, 1, 0, 1])
    assert group_medians(x, groups).ravel().tolist() == [2.0, 2.0, 2.5, 2.0, 2.5]
    # Read a few columns at a time (as calibrate() does on long videos): the same medians.
    wide = np.concatenate([x * k for k in range(1, 8)], 1)
    monkeypatch.setattr(calibration, "MEDIAN_COLUMNS", 3)
    assert group_medians(wide, groups).tolist() == (group_medians(x, groups) * np.arange(1, 8)).tolist()


def _fitted_head(num_aus=3, seed=0):
    rng = np.random.default_rng(seed)
    frames = 240
    groups = np.repeat(np.arange(6), frames // 6)
    width = max(8, num_aus)
    offset = rng.normal(size=(6, width))[groups] * 3  # each "person" has its own typical features
    expression = rng.normal(size=(frames, width))
    labels = (expression[:, :num_aus] > 0.5).astype(np.int64)  # the AU depends on the deviation only
    labels[0, 0] = 9  # unknown: masked
    probs = rng.uniform(0.2, 0.8, size=(frames, num_aus)).astype(np.float32)
    hogs = rng.normal(size=(frames, hog_dim())).astype(np.float32)
    features = (offset + expression).astype(np.float32)
    head = fit_head(probs, features, hogs, groups, labels, hog_components=4, epochs=150, lr=1e-2, l2=0.0)
    return head, (probs, features, hogs, groups, labels)


def test_fitted_head_learns_deviation_from_the_track():
    head, (probs, features, hogs, groups, labels) = _fitted_head()
    projected = (torch.from_numpy(hogs) - head.hog_mean) @ head.hog_basis.T
    out = head.calibrate(probs, np.concatenate([features, projected.numpy()], 1), groups)
    known = labels != 9
    accuracy = ((out >= 0.5) == (labels == 1))[known].mean()
    assert accuracy > 0.9
    # A frame's output depends on its own track, not on other tracks.
    inputs = np.concatenate([features, projected.numpy()], 1)
    moved = inputs.copy()
    moved[groups == 1] += 5.0
    again = head.calibrate(probs, moved, groups)
    assert np.allclose(again[groups == 0], out[groups == 0], atol=1e-6)
    moved_one = inputs.copy()
    moved_one[np.flatnonzero(groups == 0)[1:]] += 5.0  # the rest of track 0 moves: frame 0 is relatively lower
    assert not np.allclose(head.calibrate(probs, moved_one, groups)[0], out[0], atol=1e-3)


def test_head_round_trips_through_a_checkpoint(tmp_path):
    head, _ = _fitted_head(num_aus=12)
    source = tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "with_head.pt"
    thresholds = [0.3] * 12
    save_with_video_head(source, out, head_state(head), thresholds, {"video_head": {"epochs": 150}})
    raw = torch.load(out, map_location="cpu", weights_only=True)  # plain tensors only
    assert raw["video_head"]["state_dict"]["hog_basis"].dtype == torch.float16
    model = load_model(out)
    assert model.video_head is not None and model.metadata.thresholds == thresholds
    assert not any(k.startswith("video_head") for k in model.state_dict())  # MDHR's own tensors only
    x = torch.randn(5, head.linear.in_features)
    assert torch.equal(model.video_head.linear(x), head.linear(x))
    assert load_model(source).video_head is None
    with pytest.raises(AucliError, match="video_head"):
        broken = head_state(head)
        broken["state_dict"]["x_mean"] = torch.zeros(3)
        head_from_state(broken, "x.pt")
    assert load_checkpoint(out).metadata.source["video_head"] == {"epochs": 150}


def _random_head_inputs(seed: int, frames: int, num_aus: int):
    """Four tracks of random MDHR probabilities, pooled backbone (8), raw HOG and raw FHOG."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(4), frames // 4)
    probs = rng.uniform(0.2, 0.8, size=(frames, num_aus)).astype(np.float32)
    features = rng.normal(size=(frames, 8)).astype(np.float32)
    hogs = rng.normal(size=(frames, hog_dim())).astype(np.float32)
    fhogs = rng.normal(size=(frames, fhog_dim())).astype(np.float32)
    return rng, groups, probs, features, hogs, fhogs


def test_head_with_fhog_fits_projects_and_round_trips(tmp_path):
    frames, num_aus = 120, 12
    _, groups, probs, features, hogs, fhogs = _random_head_inputs(1, frames, num_aus)
    labels = (fhogs[:, :num_aus] > 0).astype(np.int64)
    head = fit_head(probs, features, hogs, groups, labels, hog_components=3, fhogs=fhogs, fhog_components=5,
                    epochs=3)
    assert head.config == {"num_aus": 12, "backbone_channels": 8, "hog_components": 3, "fhog_components": 5}
    assert head.frame_width == 16 and head.linear.in_features == 2 * 12 + 16
    raw = torch.from_numpy(np.concatenate([features, hogs, fhogs], 1))
    projected = head.project(raw)
    assert projected.shape == (frames, 16)
    assert torch.allclose(projected[:, 8:11], head.project_hog(raw[:, 8 : 8 + hog_dim()]))
    assert torch.allclose(projected[:, 11:], (raw[:, 8 + hog_dim():] - head.fhog_mean) @ head.fhog_basis.T)
    state = head_state(head)
    assert state["state_dict"]["fhog_basis"].dtype == torch.float16
    again = head_from_state(state, "x.pt")
    assert again.fhog_components == 5
    inputs = projected.numpy()
    assert np.allclose(again.calibrate(probs, inputs, groups), head.calibrate(probs, inputs, groups), atol=1e-3)
    with pytest.raises(AucliError, match="fhog-components"):
        fit_head(probs, features, hogs, groups, labels, hog_components=3, fhogs=fhogs[:, :4], fhog_components=5)
    # A head fitted before FHOG existed (no fhog_components in its config) still loads, without it.
    old, _ = _fitted_head(num_aus=3)
    stored = head_state(old)
    assert "fhog_components" not in stored["config"] and "fhog_basis" not in stored["state_dict"]
    assert head_from_state(stored, "old.pt").frame_width == old.backbone_channels + 4


def test_head_reads_some_fhog_components_as_they_are(tmp_path):
    """fhog_absolute = K: the first K FHOG components also enter as they are, so a track's output then
    depends on its level as well as on each frame's difference from the track's median."""
    frames, num_aus = 160, 5
    rng, groups, probs, features, hogs, fhogs = _random_head_inputs(2, frames, num_aus)
    fhogs[groups >= 2] += 0.5 * rng.normal(size=fhog_dim()).astype(np.float32)  # two tracks look alike
    labels = np.repeat((groups[:, None] >= 2), num_aus, 1).astype(np.int64)  # an AU present all track long
    kw = dict(hog_components=3, fhogs=fhogs, fhog_components=5, epochs=40, lr=1e-2)
    head = fit_head(probs, features, hogs, groups, labels, fhog_absolute=2, **kw)
    assert head.config == {"num_aus": 5, "backbone_channels": 8, "hog_components": 3, "fhog_components": 5,
                           "fhog_absolute": 2}
    assert head.linear.in_features == 2 * 5 + 16 + 2
    projected = head.project(torch.from_numpy(np.concatenate([features, hogs, fhogs], 1))).numpy()
    x = head.inputs(probs, projected, groups)
    assert np.allclose(x[:, -2:], projected[:, 11:13], atol=1e-5)  # as they are, not minus the median
    assert np.allclose(x[:, -7:-2], projected[:, 11:] - group_medians(projected[:, 11:], groups), atol=1e-5)
    # A relative head cannot tell the tracks apart (each frame near its own median); this one can.
    relative = fit_head(probs, features, hogs, groups, labels, **kw)
    for fitted, better in ((head, True), (relative, False)):
        out = fitted.calibrate(probs, fitted.project(torch.from_numpy(
            np.concatenate([features, hogs, fhogs], 1))).numpy(), groups)
        accuracy = ((out >= 0.5) == (labels == 1)).mean()
        assert (accuracy > 0.9) == better, accuracy
    again = head_from_state(head_state(head), "x.pt")
    assert again.fhog_absolute == 2
    assert np.allclose(again.calibrate(probs, projected, groups), head.calibrate(probs, projected, groups),
                       atol=1e-3)
    with pytest.raises(AucliError, match="fhog-absolute 6"):
        fit_head(probs, features, hogs, groups, labels, fhog_absolute=6, **kw)
    broken = head_state(head)
    broken["config"]["fhog_absolute"] = 9
    with pytest.raises(AucliError, match="x.pt: malformed video_head config"):
        head_from_state(broken, "x.pt")


def test_calibrate_in_steps_equals_all_at_once(monkeypatch):
    """calibrate() works a track, a block of rows and a block of columns at a time (its memory does
    not grow with the video); the result is the head applied to inputs() of everything at once."""
    import aucli.calibration as calibration

    frames, num_aus = 160, 5
    _, groups, probs, features, hogs, fhogs = _random_head_inputs(3, frames, num_aus)
    groups = np.random.default_rng(4).permutation(groups)  # tracks interleaved, as faces in a video
    head = fit_head(probs, features, hogs, groups, labels=(fhogs[:, :num_aus] > 0).astype(np.int64),
                    hog_components=3, fhogs=fhogs, fhog_components=5, fhog_absolute=2, epochs=3)
    inputs = head.project(torch.from_numpy(np.concatenate([features, hogs, fhogs], 1))).numpy()
    with torch.no_grad():
        x = torch.from_numpy(head.inputs(probs, inputs, groups))
        expected = torch.sigmoid(head.linear((x - head.x_mean) / head.x_std)).numpy()
    monkeypatch.setattr(calibration, "CALIBRATE_ROWS", 7)
    monkeypatch.setattr(calibration, "MEDIAN_COLUMNS", 3)
    assert np.allclose(head.calibrate(probs, inputs, groups), expected, atol=1e-6)


def _openface_vote(decisions: np.ndarray, window: int) -> np.ndarray:
    """One track's decisions (F, N) smoothed as OpenFace 2.0's FaceAnalyser does, written out as its
    loop: frames window//2 .. F-window//2-1 take the mean of the window's original decisions >= 0.5."""
    out = decisions.copy()
    half = (window - 1) // 2
    if len(decisions) > half:
        for i in range(half, len(decisions) - half):
            out[i] = decisions[i - half : i + half + 1].mean(0) >= 0.5
    return out


def test_vote_is_openface_majority_over_each_track():
    rng = np.random.default_rng(0)
    for frames in (0, 1, 3, 6, 7, 8, 40):
        d = rng.random((frames, 4)) < 0.4
        assert (vote_decisions(d, np.zeros(frames, int), 7) == _openface_vote(d, 7)).all(), frames
    d = rng.random((90, 3)) < 0.5
    groups = rng.integers(0, 3, 90)  # tracks interleaved, as faces in a video
    voted = vote_decisions(d, groups, 5)
    for g in range(3):
        rows = np.flatnonzero(groups == g)
        assert (voted[rows] == _openface_vote(d[rows], 5)).all()
    assert (voted != d).any()  # the vote changed something, so the comparison above means something
    assert (vote_decisions(d, groups, 0) == d).all()
    single = np.zeros((9, 1), bool)
    single[4] = True  # one frame alone is outvoted; a run of four in seven is not
    assert not vote_decisions(single, np.zeros(9, int), 7).any()
    single[2:6] = True
    assert vote_decisions(single, np.zeros(9, int), 7)[3:6, 0].all()
    for bad in (2, 4, 1, -3):
        with pytest.raises(AucliError, match=f"--vote {bad}: "):
            check_vote(bad)


def test_voted_thresholds_maximise_f1_after_the_vote():
    from aucli.evaluate import au_metrics, confusion, decision_metrics, scores, tune_thresholds

    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(4), 60)
    labels = np.repeat(rng.random((24, 3)) < 0.4, 10, axis=0).astype(np.int64)  # runs of ten frames
    labels[::17, 1] = 9  # unknown
    probs = np.clip(0.3 * labels + 0.7 * rng.random(labels.shape), 0, 1)  # noisy frame to frame
    grid = np.round(np.arange(0.02, 0.981, 0.02), 2)
    assert tune_voted_thresholds(probs, labels, groups, 0, grid) == tune_thresholds(probs, labels, grid)
    chosen = tune_voted_thresholds(probs, labels, groups, 7, grid)
    for n, t in enumerate(chosen):
        f1 = [scores(confusion(vote_decisions(probs[:, n : n + 1] >= g, groups, 7), labels[:, n : n + 1], 0.5))[0][0]
              for g in grid]
        assert f1[list(grid).index(t)] == max(f1)
    au_set = SimpleNamespace(num_aus=3, labels=["AU01", "AU02", "AU04"])  # what au_metrics reads
    head = VideoHead(3, 8, 2, vote=7)
    metrics = decision_metrics(head, au_set, probs, labels, chosen, groups)
    expected = au_metrics(au_set, vote_decisions(probs >= chosen, groups, 7), labels, 0.5)
    assert metrics.f1 == expected.f1 and metrics.thresholds == chosen
    plain = au_metrics(au_set, probs, labels, chosen)
    assert metrics.f1 != plain.f1
    assert decision_metrics(VideoHead(3, 8, 2), au_set, probs, labels, chosen, groups).f1 == plain.f1


def test_head_stores_its_vote(tmp_path):
    head = VideoHead(4, 8, 3, vote=7)
    assert head.config["vote"] == 7 and "vote" not in VideoHead(4, 8, 3).config  # older heads: no key
    again = head_from_state(head_state(head), "x.pt")
    assert again.vote == 7
    probs = np.tile(np.array([[0.2], [0.9], [0.2], [0.2], [0.9], [0.9], [0.9], [0.9], [0.2]]), (1, 4))
    assert again.decide(probs, [0.5] * 4, np.zeros(9, int))[:, 0].tolist() == [
        False, True, False, True, True, True, True, True, False]
    broken = head_state(head)
    broken["config"]["vote"] = 4
    with pytest.raises(AucliError, match="x.pt: malformed video_head config"):
        head_from_state(broken, "x.pt")


def _head_for(model, seed=0) -> VideoHead:
    """A random head with the shapes the tiny model needs, its weights large enough to matter."""
    torch.manual_seed(seed)
    head = VideoHead(model.au_set.num_aus, model.backbone.token_channels, 4)
    head.hog_basis.copy_(torch.randn_like(head.hog_basis) * 0.05)
    head.linear.weight.data.mul_(20)
    return head.eval()


def test_detect_and_eval_use_the_head(tmp_path):
    """detect's rows come from the head, per face track over the whole video; the overlay is drawn
    from those rows; eval applies the head too."""
    source = tiny_checkpoint(tmp_path / "tiny.pt")
    model = load_model(source)
    head = _head_for(model)
    with_head = tmp_path / "head.pt"
    save_with_video_head(source, with_head, head_state(head), [0.5] * model.au_set.num_aus)
    video = VIDEOS / "single_face.mp4"
    plain = tmp_path / "plain.json"
    calibrated = tmp_path / "calibrated.json"
    overlay = tmp_path / "overlay.mp4"
    for ckpt, out, extra in ((source, plain, []), (with_head, calibrated, ["--overlay", str(overlay)])):
        done = subprocess.run([sys.executable, "-m", "aucli", "detect", str(video), "-o", str(out),
                               "--checkpoint", str(ckpt), *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    a, b = (json.loads(p.read_text()) for p in (plain, calibrated))
    assert b["model"]["video_calibration"] is True and a["model"]["video_calibration"] is False
    pa, pb = (pd.DataFrame(doc["rows"], columns=doc["columns"]) for doc in (a, b))
    assert len(pa) == len(pb) == 72
    assert (pa["success"] == pb["success"]).all()
    cols = [c for c in pa.columns if c.endswith("_p")]
    face = pb["success"] == 1
    assert not np.allclose(pa.loc[face, cols].to_numpy(float), pb.loc[face, cols].to_numpy(float), atol=1e-3)
    assert overlay.is_file() and overlay.stat().st_size > 10_000
    decisions = pb.loc[face, [c[:-2] + "_c" for c in cols]].to_numpy(int)
    assert (decisions == (pb.loc[face, cols].to_numpy(float) >= 0.5)).all()

    # A head that votes: the same probabilities; the decisions are the vote over each face track.
    head.vote = 7
    voting, voted = tmp_path / "vote.pt", tmp_path / "voted.json"
    save_with_video_head(source, voting, head_state(head), [0.5] * model.au_set.num_aus)
    done = subprocess.run([sys.executable, "-m", "aucli", "detect", str(video), "-o", str(voted),
                           "--checkpoint", str(voting)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    doc = json.loads(voted.read_text())
    assert doc["model"]["decision_vote"] == 7 and b["model"]["decision_vote"] == 0
    pv = pd.DataFrame(doc["rows"], columns=doc["columns"])
    assert np.allclose(pv.loc[face, cols].to_numpy(float), pb.loc[face, cols].to_numpy(float), atol=1e-6)
    above = pv.loc[face, cols].to_numpy(float) >= 0.5
    got = pv.loc[face, [c[:-2] + "_c" for c in cols]].to_numpy(int)
    assert (got == vote_decisions(above, pv.loc[face, "face_id"].to_numpy(), 7)).all()
    assert (got != above).any()  # the vote changed some decisions
