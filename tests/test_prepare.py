"""`aucli prepare` on small raw-format BP4D and DISFA trees built from the sample media (spec §7.7)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from aucli.cli import app
from aucli.data.layout import load_split
from aucli.data.prepare import MARKERS, prepare
from aucli.video import open_video

MEDIA = Path(__file__).resolve().parents[1] / "sample_videos" / "videos"
BP4D_COLUMNS = [1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]


def _frames(name: str, count: int, start: int = 0) -> list[np.ndarray]:
    """RGB frames start..start+count-1 of a sample video, halved in size to keep detection quick."""
    out = []
    with open_video(MEDIA / name) as reader:
        for frame in reader:
            if frame.index >= start:
                out.append(cv2.resize(frame.image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA))
            if len(out) == count:
                break
    return out


@pytest.fixture(scope="module")
def raw_bp4d(tmp_path_factory):
    """Three subjects, one task each; F003 has two cartoon frames without a face; F001 has a coded
    frame without an image; codes include 9 (unknown)."""
    root = tmp_path_factory.mktemp("raw_bp4d")
    man, woman, cartoon = _frames("single_face.mp4", 8), _frames("WolfgangLanger_Pexels.mp4", 16, 40), _frames("no_face.mp4", 2)
    videos = {"F001": man, "F002": woman[:8], "F003": woman[8:11] + cartoon + woman[11:14]}
    rng = np.random.default_rng(0)
    for subject, frames in videos.items():
        folder = root / "frames" / subject / "T1"
        folder.mkdir(parents=True)
        numbers = list(range(100, 100 + len(frames)))
        for n, image in zip(numbers, frames):
            cv2.imwrite(str(folder / f"{n:04d}.jpg"), image[..., ::-1])  # zero-padded names, as some copies have
        coded = numbers + ([100 + len(frames)] if subject == "F001" else [])
        table = rng.integers(0, 2, (len(coded), len(BP4D_COLUMNS)))
        table[1, 3] = 9
        header = ["0"] + [str(au) for au in BP4D_COLUMNS] + ["27"]  # an extra AU column is ignored
        lines = [",".join(header)] + [",".join(map(str, [n, *row, 0])) for n, row in zip(coded, table)]
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"{subject}_T1.csv").write_text("\n".join(lines) + "\n")
    (root / "parts.json").write_text(json.dumps({"F001": 1, "F002": 2, "F003": 3}))
    return root


def test_prepare_bp4d_lists_crops_and_resume(raw_bp4d, tmp_path):
    out = tmp_path / "bp4d"
    kwargs = dict(source=raw_bp4d / "frames", labels=raw_bp4d / "labels", output=out,
                  parts=raw_bp4d / "parts.json", chunk=16)
    summary = prepare("bp4d", **kwargs)
    assert summary["frames"] == 24 and summary["frames_written"] == 24
    # The two cartoon frames have no face; they are reported and aligned with the nearest face.
    assert summary["missing_by_video"] == {"F003/T1": [103, 104]}
    assert any("F001_T1.csv: 1 coded frames have no image" in p for p in summary["problems"])

    # Fold 1 tests on part 3 (F003) and trains on parts 1 + 2, in that order (spec §7.5).
    train, test = load_split(out, "bp4d", "train", 1), load_split(out, "bp4d", "test", 1)
    assert train.paths[0] == "F001/T1/100.jpg" and train.paths[-1] == "F002/T1/107.jpg" and len(train) == 16
    assert test.subjects == ["F003"] and len(test) == 8
    csv = (raw_bp4d / "labels" / "F001_T1.csv").read_text().splitlines()
    assert train.labels[1].tolist() == [int(v) for v in csv[2].split(",")[1:13]]
    assert train.labels[1, 3] == 9  # unknown codes are kept
    assert load_split(out, "bp4d", "test", 3).subjects == ["F001"]
    crop = cv2.imread(str(out / "img" / "F002/T1/103.jpg"))
    assert crop.shape == (256, 256, 3)
    assert (out / "BP4D_train_weight_fold2.txt").is_file()

    # A rerun does nothing; after losing one unit, only that unit is redone.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "img").rglob("*.jpg")}
    done = CliRunner().invoke(app, ["prepare", "bp4d", "--frames", str(raw_bp4d / "frames"), "--labels",
                                    str(raw_bp4d / "labels"), "-o", str(out), "--parts", str(raw_bp4d / "parts.json"),
                                    "--chunk", "16"])
    assert done.exit_code == 0, done.output
    assert "24 of 24 frames written" in done.output and "2 without a detected face" in done.output
    assert {p: p.stat().st_mtime_ns for p in (out / "img").rglob("*.jpg")} == stamps
    (out / MARKERS / "F002_T1.000000.json").unlink()
    (out / "img" / "F002/T1/101.jpg").unlink()
    prepare("bp4d", **kwargs)
    assert (out / "img" / "F002/T1/101.jpg").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if "F002" not in str(p))

    # --drop-missing leaves the faceless frames out of the lists (only F003 here, to save time).
    (tmp_path / "f003.json").write_text(json.dumps({"F003": 3}))
    dropped = prepare("bp4d", **{**kwargs, "output": tmp_path / "dropped", "parts": tmp_path / "f003.json"},
                      drop_missing=True)
    assert dropped["frames_written"] == 6
    test = load_split(tmp_path / "dropped", "bp4d", "test", 1)
    assert "F003/T1/103.jpg" not in test.paths and len(test.videos(split_on_gap=True)) == 2


def test_prepare_disfa_from_videos_in_parallel(tmp_path):
    raw = tmp_path / "raw"
    frames = _frames("single_face.mp4", 10) + _frames("WolfgangLanger_Pexels.mp4", 20, 40)
    intensities = {}
    for i, subject in enumerate(("SN001", "SN002", "SN003")):
        video = raw / "Videos_LeftCamera" / f"LeftVideo{subject}_comp.avi"
        video.parent.mkdir(parents=True, exist_ok=True)
        h, w = frames[0].shape[:2]
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 20, (w, h))
        for image in frames[i * 10 : i * 10 + 10]:
            writer.write(cv2.resize(image, (w, h))[..., ::-1])
        writer.release()
        (raw / "Videos_RightCamera").mkdir(exist_ok=True)
        (raw / "Videos_RightCamera" / f"RightVideo{subject}_comp.avi").write_bytes(b"")  # never used
        folder = raw / "ActionUnit_Labels" / subject
        folder.mkdir(parents=True)
        for au in (1, 2, 4, 6, 9, 12, 25, 26):
            values = (np.arange(10) + au + i) % 6
            intensities[subject, au] = values
            (folder / f"{subject}_au{au}.txt").write_text("".join(f"{n + 1},{v}\n" for n, v in enumerate(values)))
    (tmp_path / "parts.txt").write_text("SN001\nSN002\nSN003\n")
    out = tmp_path / "disfa"
    summary = prepare("disfa", source=raw, labels=raw / "ActionUnit_Labels", output=out,
                      parts=tmp_path / "parts.txt", workers=2, chunk=16)
    assert summary["frames_written"] == 30 and not summary["problems"]
    test = load_split(out, "disfa", "test", 2)
    assert test.paths[0] == "SN002/SN002_0.png" and (out / "img_o" / test.paths[9]).is_file()
    # Occurrence = intensity >= 2 (spec §7.7), line order = frame order.
    assert test.labels[:, 0].tolist() == (intensities["SN002", 1] >= 2).astype(int).tolist()
    assert test.labels[:, 7].tolist() == (intensities["SN002", 26] >= 2).astype(int).tolist()
