"""aucli detect end to end: rows per frame, windows, invariance, writers, the command line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import av
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from media_fixtures import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    IMAGES,
    SAMPLE_FRAMES,
    VIDEOS,
    make_audio,
    make_video,
    one_torch_thread,
    tiny_checkpoint,
    tiny_model,
)

import aucli
from aucli.faces import face_to_tensor
from aucli.pipeline import REDETECT, Detector
from aucli.windows import WindowPredictor, window_layout, window_positions
from aucli.writers import get_writer, read_table

AUS = ["AU01", "AU02", "AU04", "AU06", "AU07", "AU10", "AU12", "AU14", "AU15", "AU17", "AU23", "AU24"]
P_COLUMNS = [f"{au}_p" for au in AUS]
C_COLUMNS = [f"{au}_c" for au in AUS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", clip_length=12, k=2)


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector(checkpoint, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def tables(detector):
    """Each sample video through the pipeline once, shared by the tests below."""
    cache: dict[str, pd.DataFrame] = {}

    def get(name: str) -> pd.DataFrame:
        if name not in cache:
            cache[name] = detector.run(VIDEOS / name)
        return cache[name]

    return get


def _pts(path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float(f.pts * stream.time_base) for f in container.decode(stream)]


def _check_rows(table: pd.DataFrame, name: str) -> None:
    assert len(table) == SAMPLE_FRAMES[name]
    assert table["frame"].tolist() == list(range(1, len(table) + 1))
    assert table["timestamp"].to_numpy() == pytest.approx(_pts(VIDEOS / name), abs=0.0005 + 1e-9)  # 3 decimals
    assert table["timestamp"].is_monotonic_increasing and table["timestamp"].is_unique
    assert list(table.columns[:9]) == [
        "frame", "face_id", "timestamp", "confidence", "success", "face_x", "face_y", "face_w", "face_h"
    ]
    assert list(table.columns[9:]) == C_COLUMNS + P_COLUMNS
    found = table[table["success"] == 1]
    assert found[P_COLUMNS].ge(0).all().all() and found[P_COLUMNS].le(1).all().all()
    assert found[C_COLUMNS].notna().all().all()
    clear = (found[P_COLUMNS] - 0.5).abs().to_numpy() > 1e-4  # away from rounding at the threshold
    decided = found[C_COLUMNS].to_numpy(dtype=int) == (found[P_COLUMNS].to_numpy() >= 0.5)
    assert decided[clear].all()
    missing = table[table["success"] == 0]
    assert missing[C_COLUMNS + P_COLUMNS + ["face_x", "face_w"]].isna().all().all()
    assert (missing["confidence"] == 0).all()


@pytest.mark.parametrize("name", ["single_face.mp4", "face_noface.mov", "no_face.mp4"])
def test_one_row_per_decoded_frame_with_pts_timestamps(tables, name):
    _check_rows(tables(name), name)


@pytest.mark.slow
def test_one_row_per_frame_long_sample(tables):
    table = tables("WolfgangLanger_Pexels.mp4")
    _check_rows(table, "WolfgangLanger_Pexels.mp4")
    assert table["success"].mean() > 0.9


def test_faces_found_only_where_there_is_one(tables):
    assert tables("single_face.mp4")["success"].all()
    assert (tables("no_face.mp4")["success"] == 0).all()
    assert (tables("no_face.mp4")["face_id"] == 0).all()
    success = tables("face_noface.mov")["success"].to_numpy()  # HEVC: the man, then a cartoon title
    assert success[:60].all() and not success[90:].any()
    table = tables("single_face.mp4")
    assert ((table["face_x"] >= -10) & (table["face_x"] + table["face_w"] <= 650)).all()
    assert (table["confidence"] >= 0.9).all()


def test_metadata_in_attrs(tables, checkpoint):
    attrs = tables("single_face.mp4").attrs
    model = attrs["model"]
    assert model["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (model["clip_length"], model["k"], model["backbone"]) == (12, 2, "resnet_tiny")
    assert model["aus"] == AUS and len(model["au_names"]) == 12 and model["thresholds"] == [0.5] * 12
    video = attrs["video"]
    assert (video["width"], video["height"], video["frame_count"], video["rotation"]) == (640, 360, 72, 0)
    assert video["fps"] == pytest.approx(30.0) and video["duration"] == pytest.approx(2.4)
    assert attrs["aucli_version"] == aucli.__version__
    assert model["precision"] in ("fp32", "bf16") and model["redetect"] == REDETECT
    assert attrs["summary"]["frames"] == 72 and attrs["summary"]["frames_with_face"] == 72
    assert set(attrs["summary"]["stages"]) == {"decode", "faces", "model"}


def test_json_and_csv_hold_the_same_table(tables, tmp_path):
    table = tables("face_noface.mov")
    csv_path = get_writer("csv").write(table, tmp_path / "out.csv")
    json_path = get_writer("json").write(table, tmp_path / "out.json")
    from_csv, from_json = read_table(csv_path), read_table(json_path)
    pd.testing.assert_frame_equal(from_csv, from_json)
    pd.testing.assert_frame_equal(from_csv, table)
    document = json.loads(json_path.read_text())
    plain = pd.DataFrame(document["rows"], columns=document["columns"])
    pd.testing.assert_frame_equal(plain, pd.read_csv(csv_path), check_dtype=False)
    assert document["model"]["sha256"] == table.attrs["model"]["sha256"]
    assert document["video"]["codec"] == "hevc" and document["aucli_version"] == aucli.__version__
    assert ",," in csv_path.read_text().splitlines()[-1]  # empty AU cells without a face


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_batch_size_does_not_change_results(checkpoint, precision):
    tables = [
        Detector(checkpoint, device="cpu", batch_size=batch_size, precision=precision).run(VIDEOS / "single_face.mp4")
        for batch_size in (8, 1, 5)
    ]
    reference = tables[0]
    for table in tables[1:]:
        assert np.abs(table[P_COLUMNS].to_numpy() - reference[P_COLUMNS].to_numpy()).max() <= 1e-4
        pd.testing.assert_frame_equal(table.drop(columns=P_COLUMNS), reference.drop(columns=P_COLUMNS))


@pytest.mark.parametrize("clip_length, k", [(12, 2), (8, 2), (16, 5)])
def test_windows_match_the_model_on_the_exact_window(clip_length, k):
    """Every frame equals model(clip) on its window, whatever the batch size and
    however frames of several segments arrive; backbone once per frame."""
    model = tiny_model(clip_length, k)
    rng = np.random.default_rng(0)
    segments = {name: rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8) for name, n in
                [("long", 4 * clip_length + 5), ("short", 3), ("single", 1)]}
    arrivals = [("long", i) for i in range(len(segments["long"]))]
    arrivals[5:5] = [("short", i) for i in range(3)]
    arrivals[9:9] = [("single", 0)]
    encoded = []
    original = model.encode_frames
    model.encode_frames = lambda frames: encoded.append(len(frames)) or original(frames)
    results = {}
    for batch_size in (1, 5, 16):
        encoded.clear()
        predictor = WindowPredictor(model, clip_length, face_to_tensor, batch_size)
        got = {}
        for name, i in arrivals:
            predictor.add(name, (name, i), segments[name][i])
            if i == len(segments[name]) - 1:
                predictor.end(name)
            got.update(predictor.pop_results())
        predictor.flush()
        got.update(predictor.pop_results())
        assert sum(encoded) == len(arrivals)  # the backbone saw each face once
        results[batch_size] = got
    last = len(segments["long"]) - 1  # long enough for several shared windows
    checked = {"long": [0, 1, 2, 3, clip_length // 2, 2 * clip_length + 1, 3 * clip_length, last - 1, last],
               "short": [0, 1, 2], "single": [0]}
    with torch.inference_mode():
        for name, faces in segments.items():
            for i in checked[name]:
                window, position = window_positions(i, len(faces), clip_length, k)
                expected = model(face_to_tensor(faces[window])[None])[0, position].numpy()
                for got in results.values():
                    np.testing.assert_allclose(got[(name, i)], expected, atol=1e-5, rtol=0)


def test_codes_live_in_a_bounded_buffer():
    model = tiny_model(16, 5)
    predictor = WindowPredictor(model, 16, face_to_tensor, batch_size=4)
    face = np.full((32, 32, 3), 128, np.uint8)
    held, done = [], 0
    for i in range(150):
        predictor.add("seg", i, face)
        done += len(predictor.pop_results())
        seg = predictor._segments["seg"]
        held.append(max(len(seg.static), len(seg.motion)))
    predictor.flush()
    done += len(predictor.pop_results())
    assert done == 150 and not predictor._segments
    window = (predictor.groups_per_job - 1) * predictor.stride + 16
    assert max(held) <= window + predictor.batch_size  # not growing with the video


def test_window_rule_centres_every_frame():
    stride, centre = window_layout(16, 5)
    assert (stride, centre) == (2, 7)  # the reference's T=16, k=5
    window, position = window_positions(0, 100, 16, 5)
    assert window == [0] * 8 + list(range(1, 9)) and position == 7  # first face repeated
    window, position = window_positions(51, 100, 16, 5)
    assert window == list(range(43, 59)) and position == 8
    window, position = window_positions(99, 100, 16, 5)
    assert window[position:] == [99] * (16 - position) and position == 8
    window, position = window_positions(2, 4, 16, 5)  # a segment shorter than T: padded both ends
    assert window == [0] * 6 + [1, 2, 3] + [3] * 7 and position == 7
    assert window_layout(8, 2) == (1, 3)


def test_faces_all_tracks_every_face(checkpoint, tmp_path):
    folder = tmp_path / "group"
    folder.mkdir()
    image = cv2.imread(str(IMAGES / "multi_face.jpg"))
    for i in range(3):  # the group drifts right by 24 px a frame
        shifted = np.roll(image, 24 * i, axis=1)
        cv2.imwrite(str(folder / f"img_{i + 1:03d}.png"), shifted)
    everyone = aucli.detect(folder, checkpoint, device="cpu", faces="all", fps=10)
    assert len(everyone) == 15 and everyone["success"].all()
    assert everyone.groupby("frame")["face_id"].apply(sorted).tolist() == [[0, 1, 2, 3, 4]] * 3
    drift = everyone.sort_values(["face_id", "frame"]).groupby("face_id")["face_x"].diff().dropna()
    assert drift.between(24 - 10, 24 + 10).all()  # same face, same id, frame after frame
    assert everyone["timestamp"].unique().tolist() == [0.0, 0.1, 0.2]
    main = aucli.detect(folder, checkpoint, device="cpu", fps=10)
    assert len(main) == 3 and (main["face_id"] == 0).all()
    first = everyone[everyone["frame"] == 1]
    followed = first.loc[(first["face_w"] * first["face_h"]).idxmax(), "face_id"]  # largest at the start
    assert main["face_x"].tolist() == everyone.loc[everyone["face_id"] == followed, "face_x"].tolist()


def test_default_resnet50_model_end_to_end(tmp_path):
    from aucli.checkpoint import save_checkpoint
    from aucli.model import MDHR

    torch.manual_seed(0)
    checkpoint = tmp_path / "r50.pt"
    save_checkpoint(checkpoint, MDHR("disfa"), clip_length=16, source={"kind": "random"})
    folder = tmp_path / "frames"
    folder.mkdir()
    with av.open(str(VIDEOS / "single_face.mp4")) as container:
        for i, frame in zip(range(5), container.decode(video=0)):
            frame.to_image().save(folder / f"{i:04d}.jpg")
    table = aucli.detect(folder, checkpoint, device="cpu")
    assert len(table) == 5 and table["success"].all()
    assert list(table.columns[9:17]) == [f"AU{au:02d}_c" for au in (1, 2, 4, 6, 9, 12, 25, 26)]
    assert table.attrs["model"]["backbone"] == "resnet50" and table.attrs["model"]["clip_length"] == 16


# ----- the command line ------------------------------------------------------------
def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    from aucli.cli import main

    monkeypatch.setattr(sys, "argv", ["aucli", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def _one_line_error(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aucli: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0]


def _bad_input(tmp_path, kind: str):
    if kind == "missing":
        return tmp_path / "missing.mp4"
    if kind == "no videos":
        (tmp_path / "nothing").mkdir()
        (tmp_path / "nothing" / "notes.txt").write_text("hi")
        return tmp_path / "nothing"
    if kind == "empty":
        (tmp_path / "empty.mp4").touch()
        return tmp_path / "empty.mp4"
    if kind == "text":
        (tmp_path / "text.mp4").write_text("this is text\n" * 50)
        return tmp_path / "text.mp4"
    return make_audio(tmp_path / "audio.m4a")


@pytest.mark.parametrize("kind", ["missing", "no videos", "empty", "text", "audio"])
def test_bad_inputs_fail_with_one_line_and_no_output(tmp_path, monkeypatch, capsys, checkpoint, kind):
    source = _bad_input(tmp_path, kind)
    out = tmp_path / "out"
    code, err = run_cli(monkeypatch, capsys, "detect", source, "-o", out / "x.csv", "--checkpoint", checkpoint)
    assert code == 1
    _one_line_error(err, str(source))
    assert not out.exists() or not any(out.iterdir())


def test_unwritable_output_and_checkpoint_problems(tmp_path, monkeypatch, capsys, checkpoint):
    clip = make_video(tmp_path / "clip.mp4")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    code, err = run_cli(monkeypatch, capsys, "detect", clip, "-o", blocker / "x.csv", "--checkpoint", checkpoint)
    assert code == 1
    _one_line_error(err, str(clip), "cannot write")

    monkeypatch.chdir(tmp_path)  # no ./weights here, and (as if left out of the install) no starter
    monkeypatch.delenv("AUCLI_CHECKPOINT", raising=False)
    monkeypatch.setattr("aucli.pipeline.STARTER", tmp_path / "no-starter.pt")
    code, err = run_cli(monkeypatch, capsys, "detect", clip)
    assert code == 2
    _one_line_error(err, "checkpoint", "train", "convert")
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    monkeypatch.setenv("AUCLI_CHECKPOINT", str(bad))
    code, err = run_cli(monkeypatch, capsys, "detect", clip)
    assert code == 1
    _one_line_error(err, str(bad))
    assert not (tmp_path / "clip.csv").exists()

    monkeypatch.delenv("AUCLI_CHECKPOINT")
    (tmp_path / "weights").mkdir()
    shutil.copy(checkpoint, tmp_path / "weights" / "only.pt")
    code, err = run_cli(monkeypatch, capsys, "detect", clip, "--quiet")
    assert code == 0 and err == ""
    assert len(pd.read_csv(tmp_path / "clip.csv")) == 10


@pytest.mark.parametrize("device", ["gpu", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_a_face_device_that_is_not_there_is_a_one_line_usage_error(tmp_path, monkeypatch, capsys, checkpoint,
                                                                   device):
    clip = make_video(tmp_path / "clip.mp4")
    out = tmp_path / "aus.csv"
    code, err = run_cli(monkeypatch, capsys, "detect", clip, "-o", out, "--checkpoint", checkpoint,
                        "--device", "cpu", "--face-device", device)
    assert code == 2
    _one_line_error(err, f"--face-device {device}")
    assert not out.exists()


def test_output_with_an_unknown_suffix_is_refused_not_made_a_folder(tmp_path, monkeypatch, capsys, checkpoint):
    clip = make_video(tmp_path / "clip.mp4")
    code, err = run_cli(monkeypatch, capsys, "detect", clip, "-o", tmp_path / "aus.txt", "--checkpoint", checkpoint)
    assert code == 2
    _one_line_error(err, "aus.txt", ".csv or .json")
    assert not (tmp_path / "aus.txt").exists()
    existing = tmp_path / "results.v2"  # a folder that exists may have a suffix
    existing.mkdir()
    code, err = run_cli(monkeypatch, capsys, "detect", clip, "-o", existing, "--checkpoint", checkpoint, "--quiet")
    assert code == 0 and len(pd.read_csv(existing / "clip.csv")) == 10


def test_several_inputs_one_failure(tmp_path, monkeypatch, capsys, checkpoint):
    for folder in ("a", "b"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        make_video(tmp_path / "in" / folder / "clip.mp4")
    (tmp_path / "in" / "broken.mp4").write_text("not a video")
    out = tmp_path / "out"
    code, err = run_cli(
        monkeypatch, capsys, "detect", tmp_path / "in", tmp_path / "gone.mp4", "-o", out,
        "--checkpoint", checkpoint, "--format", "json",
    )
    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == ["a_clip.json", "b_clip.json"]  # no overwrite
    assert "2 of 4 input(s) failed" in err and "broken.mp4" in err and "gone.mp4" in err
    assert "Traceback" not in err
    table = read_table(out / "a_clip.json")
    assert len(table) == 10 and not table["success"].any()


def test_cli_writes_json_and_csv_that_agree(tmp_path, monkeypatch, capsys, checkpoint):
    clip = shutil.copy(VIDEOS / "single_face.mp4", tmp_path / "clip.mp4")
    code, err = run_cli(monkeypatch, capsys, "detect", clip, "-o", tmp_path / "r.json", "--checkpoint", checkpoint)
    assert code == 0
    assert "72 frames, 100% with a face" in err and "frames/s" in err
    for stage in ("decode", "faces", "model", "write"):
        assert stage in err
    code, _ = run_cli(monkeypatch, capsys, "detect", clip, "-o", tmp_path / "r.csv", "--checkpoint", checkpoint,
                      "--threshold", "0", "-q")
    assert code == 0
    from_json, from_csv = read_table(tmp_path / "r.json"), read_table(tmp_path / "r.csv")
    pd.testing.assert_frame_equal(from_json[P_COLUMNS], from_csv[P_COLUMNS])
    assert (from_csv[C_COLUMNS] == 1).all().all()  # --threshold 0 overrides the checkpoint's 0.5
    header = json.loads((tmp_path / "r.json").read_text())
    assert header["model"]["checkpoint"] == str(checkpoint) and header["video"]["frame_count"] == 72
    assert not list(tmp_path.glob(".*part"))  # no temporary files left


def test_precision_and_redetect_options(tmp_path, monkeypatch, capsys, checkpoint):
    clip = make_video(tmp_path / "clip.mp4")
    code, _ = run_cli(monkeypatch, capsys, "detect", clip, "-o", tmp_path / "r.json", "--checkpoint", checkpoint,
                      "--precision", "fp32", "--redetect", "1", "-q")
    assert code == 0
    header = json.loads((tmp_path / "r.json").read_text())
    assert header["model"]["precision"] == "fp32" and header["model"]["redetect"] == 1
    for option, value in (("--precision", "fp16"), ("--redetect", "0")):
        code, err = run_cli(monkeypatch, capsys, "detect", clip, "--checkpoint", checkpoint, option, value)
        assert code == 2 and option in err and "Traceback" not in err
    assert not (tmp_path / "clip.csv").exists()


def test_truncated_video_keeps_frames_and_warns(tmp_path, monkeypatch, capsys, checkpoint):
    noise = np.random.default_rng(0).integers(0, 256, (40, 96, 128, 3), dtype=np.uint8)
    clip = make_video(tmp_path / "whole.mp4", pts_ms=[i * 40 for i in range(40)], size=(128, 96),
                      options={"movflags": "faststart"}, frames=list(noise))  # index before data
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    code, err = run_cli(monkeypatch, capsys, "detect", cut, "-o", tmp_path / "cut.csv", "--checkpoint", checkpoint)
    assert code == 0
    rows = len(pd.read_csv(tmp_path / "cut.csv"))
    assert 0 < rows < 40
    assert f"breaks off after {rows} frames" in err and "promised 40" in err


def test_interrupted_write_leaves_no_file(tmp_path, tables, monkeypatch):
    table = tables("no_face.mp4")
    target = tmp_path / "out.csv"
    target.write_text("previous complete result\n")
    writer = get_writer("csv")

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(KeyboardInterrupt):
        writer.write(table, target)
    assert target.read_text() == "previous complete result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_program_exits_at_once_after_detect_with_everything_written(tmp_path, checkpoint):
    """``python -m aucli detect`` ends without Python's shutdown (aucli.cli.entry): the
    tables are complete, stderr is flushed, the exit status is kept; other commands end as usual."""
    import subprocess

    clip = shutil.copy(VIDEOS / "single_face.mp4", tmp_path / "clip.mp4")
    command = [sys.executable, "-m", "aucli", "detect", str(clip), str(tmp_path / "gone.mp4"),
               "-o", str(tmp_path / "out"), "--format", "json", "--checkpoint", str(checkpoint), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the in-process tests (one_torch_thread)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stderr  # one input failed
    assert "72 frames, 100% with a face" in done.stderr and done.stderr.rstrip().endswith("no such file or directory")
    table = read_table(tmp_path / "out" / "clip.json")
    assert len(table) == 72 and table["success"].all()
    done = subprocess.run(command[:5] + command[6:], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "72 frames" in done.stderr, done.stderr
    version = subprocess.run([sys.executable, "-m", "aucli", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("aucli ")


def test_rows_kept_for_the_end_of_a_video_come_back_exactly():
    """With a calibration head, per-face rows wait for the end of the video in mapped blocks
    (pipeline._KeptRows, which keeps memory flat in video length): exact, across blocks."""
    from aucli.faces import FaceDetection, TrackedFace
    from aucli.pipeline import _KeptRows

    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 5)).astype(np.float32)
    kept = _KeptRows(np.float32, rows_per_block=3)
    assert [kept.keep(row) for row in data] == list(range(7))
    assert np.array_equal(kept.rows(), data)
    some = np.array([6, 0, 4, 3, 4])  # any order, repeats, across the three blocks
    assert np.array_equal(kept.take(some), data[some])
    assert kept.take(np.array([], np.int64)).shape == (0, 5)
    faces = _KeptRows(np.float64, rows_per_block=2)
    tracked = [TrackedFace(i, 10 + i, FaceDetection(rng.uniform(0, 640, 4), rng.uniform(0, 640, (5, 2)), 0.9 + i / 100))
               for i in range(3)]
    stored = [faces.keep_face(face) for face in tracked]
    rows = faces.rows()
    for face, k in zip(tracked, stored):
        assert (k.face_id, k.segment, k.confidence) == (face.face_id, face.segment, face.detection.confidence)
        assert np.array_equal(rows[k.index, :4], face.detection.box)
        assert np.array_equal(rows[k.index, 4:].reshape(-1, 2), face.detection.landmarks)


def test_face_stage_beside_the_model_gives_the_same_table(tables, detector, checkpoint, monkeypatch):
    """``overlap``: decoding and the face stage run on a thread of their own, up to
    AHEAD_GROUPS groups of frames ahead of the model; the table is the same to the bit."""
    from aucli import pipeline

    beside = Detector(checkpoint, device="cpu", batch_size=8, overlap=True)
    assert beside.overlap and not detector.overlap  # the suite's one torch thread: apart by default
    follow, policies = pipeline.FaceFollower.__call__, set()

    def noting(self, images):  # the face thread only takes cores nothing else wants (Linux)
        policies.add(os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None)
        return follow(self, images)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.FaceFollower, "__call__", noting)
        tables_beside = {name: beside.run(VIDEOS / name) for name in ("face_noface.mov", "single_face.mp4")}
    assert policies == ({os.SCHED_IDLE} if hasattr(os, "SCHED_IDLE") else {None})
    for name, table in tables_beside.items():
        pd.testing.assert_frame_equal(table, tables(name), check_exact=True)
        assert table.attrs["model"]["overlap"] is True
        assert table.attrs["summary"]["stages"]["faces"] > 0
    everyone = [Detector(checkpoint, device="cpu", faces="all", overlap=o).run(VIDEOS / "face_noface.mov")
                for o in (False, True)]
    pd.testing.assert_frame_equal(*everyone, check_exact=True)


def test_face_thread_failures_and_interrupts_stop_the_run_and_the_thread(checkpoint, monkeypatch):
    import threading

    from aucli import pipeline
    from aucli.errors import AucliError

    def threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == "aucli-faces"]

    follow = pipeline.FaceFollower.__call__
    groups = []

    def failing(self, images):
        groups.append(len(images))
        if len(groups) == 3:
            raise AucliError("frame 33 is broken")
        return follow(self, images)

    beside = Detector(checkpoint, device="cpu", batch_size=8, overlap=True)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.FaceFollower, "__call__", failing)
        with pytest.raises(AucliError, match="frame 33 is broken"):
            beside.run(VIDEOS / "WolfgangLanger_Pexels.mp4")
    assert groups == [16, 16, 16] and not threads()

    add = WindowPredictor.add
    faces = []

    def interrupted(self, segment, key, face):
        faces.append(key)
        if len(faces) == 40:
            raise KeyboardInterrupt
        return add(self, segment, key, face)

    with monkeypatch.context() as patch:
        patch.setattr(WindowPredictor, "add", interrupted)
        with pytest.raises(KeyboardInterrupt):
            beside.run(VIDEOS / "WolfgangLanger_Pexels.mp4")
    assert len(faces) == 40 and not threads()


def test_float32_convolutions_stay_float32_on_a_gpu(tmp_path, monkeypatch, checkpoint):
    """cuDNN's TF32 is turned off while a run has a GPU, and restored after; on the CPU
    nothing changes. Detector.run enters it with the model's and the face detector's devices."""
    from aucli import pipeline

    cudnn = torch.backends.cudnn
    monkeypatch.setattr(cudnn, "allow_tf32", True)
    with pipeline.float32_convolutions(torch.device("cpu")):
        assert cudnn.allow_tf32
    with pipeline.float32_convolutions(torch.device("cpu"), torch.device("cuda")):
        assert not cudnn.allow_tf32
    assert cudnn.allow_tf32
    with pytest.raises(KeyError), pipeline.float32_convolutions(torch.device("cuda:0")):
        raise KeyError("a failure inside")
    assert cudnn.allow_tf32

    entered = []
    real = pipeline.float32_convolutions

    def noting(*devices):
        entered.append(devices)
        return real(*devices)

    monkeypatch.setattr(pipeline, "float32_convolutions", noting)
    table = Detector(checkpoint, device="cpu", face_device="cpu").run(make_video(tmp_path / "clip.mp4"))
    assert len(table) == 10 and entered == [(torch.device("cpu"), torch.device("cpu"))]


def test_overlap_only_where_idle_openmp_threads_sleep(monkeypatch):
    from aucli.pipeline import overlap_default

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for policy, expected in (("PASSIVE", True), ("passive", True), ("ACTIVE", False), (None, False)):
        if policy is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        assert overlap_default(cpu) is expected, policy
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert overlap_default(cpu) is False


def test_cli_overlaps_the_face_stage_unless_told_otherwise(tmp_path, checkpoint):
    """`aucli detect` sets OMP_WAIT_POLICY=PASSIVE before torch loads, unless the environment
    sets a policy; with two torch threads the face stage then runs beside the model."""
    import subprocess

    clip = shutil.copy(VIDEOS / "single_face.mp4", tmp_path / "clip.mp4")
    seen, rows = {}, {}
    # --no-overlap and --face-device choose for themselves, whatever the environment.
    for policy, flags in ((None, ()), ("ACTIVE", ()), (None, ("--no-overlap", "--face-device", "cpu"))):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env["OMP_NUM_THREADS"] = "2"
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        out = tmp_path / f"{policy}{len(flags)}.json"
        done = subprocess.run([sys.executable, "-m", "aucli", "detect", str(clip), "-o", str(out), "--checkpoint",
                               str(checkpoint), "--device", "cpu", *flags],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert "72 frames, 100% with a face" in done.stderr and " s (decode " in done.stderr
        written = json.loads(out.read_text())
        seen[policy, flags] = written["model"]["overlap"], written["model"]["face_device"]
        rows[policy, flags] = written["rows"]
    assert list(seen.values()) == [(True, "cpu"), (False, "cpu"), (False, "cpu")]
    assert all(r == rows[None, ()] for r in rows.values())
