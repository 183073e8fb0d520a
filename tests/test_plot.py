"""aucli plot: the timeline's data, the images it writes, and the command line."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from aucli.cli import app
from aucli.pipeline import format_table, table_columns
from aucli.plot import GAP, draw, plot_table, timeline
from aucli.writers import get_writer, read_table

OPENFACE = [1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25, 26, 45]  # the 17-AU set


def detect_table(aus: list[int], frames: int, faces: dict[int, np.ndarray], fps: float = 30.0,
                 seed: int = 0) -> pd.DataFrame:
    """A table shaped like detect's with --faces all: ``faces[id]`` says in which frames that face
    is found; frames with none get one face_id -1 row. AU01 is active exactly in frames 10-19."""
    rng = np.random.default_rng(seed)
    labels = [f"AU{au:02d}" for au in aus]
    rows = []
    for i in range(frames):
        present = [f for f, mask in faces.items() if mask[i]]
        for f in present:
            p = rng.uniform(0.05, 0.45, len(aus))
            p[0] = 0.8 if 10 <= i < 20 else 0.2
            rows.append([i + 1, f, i / fps, 0.99, 1, 10.0, 10.0, 50.0, 50.0, *(p >= 0.5).astype(int), *p])
        if not present:
            rows.append([i + 1, -1, i / fps, 0.0, 0] + [np.nan] * 4 + [None] * len(aus) + [np.nan] * len(aus))
    return format_table(pd.DataFrame(rows, columns=table_columns(labels)), labels)


@pytest.fixture()
def two_faces() -> pd.DataFrame:
    """60 frames: face 0 everywhere but frames 30-39 (and 45-47, where no face is found at all);
    face 1 in frames 20-49 except 45-47."""
    zero = np.ones(60, bool)
    zero[30:40] = zero[45:48] = False
    one = np.zeros(60, bool)
    one[20:50] = True
    one[45:48] = False
    return detect_table([1, 2, 4, 6, 12], 60, {0: zero, 1: one})


def test_timeline_keeps_every_frame_and_marks_gaps(two_faces):
    line = timeline(two_faces, 0)
    assert line.labels == ["AU01", "AU02", "AU04", "AU06", "AU12"] and line.frames == 60 and not line.binned
    assert line.names[0] == "inner brow raiser" and line.names[4] == "lip corner puller"
    assert line.face_frames == 47
    expected_gap = np.zeros(60, bool)
    expected_gap[30:40] = expected_gap[45:48] = True
    assert np.array_equal(line.gap, expected_gap) and np.isnan(line.prob[line.gap]).all()
    assert np.allclose(line.edges[:-1], np.arange(60) / 30, atol=5e-4)  # timestamps keep 3 decimals
    assert line.edges[-1] == pytest.approx(2.0, abs=1e-3)
    assert line.share[0] == pytest.approx(10 / 47)  # AU01 is on in frames 10-19 only
    mine = two_faces[(two_faces.face_id == 0) & (two_faces.success == 1)]
    assert np.allclose(line.prob[~line.gap], mine[[f"{a}_p" for a in line.labels]].to_numpy(float))
    other = timeline(two_faces, 1)
    assert other.face_frames == 27 and other.gap[:20].all() and not other.gap[20:45].any()
    assert other.share[0] == 0.0


def test_long_videos_are_binned_for_drawing_only():
    frames = 18_000  # ten minutes at 30 fps
    face = np.ones(frames, bool)
    face[9_000] = False  # one frame without a face, far shorter than a column
    table = detect_table([1, 2, 4], frames, {0: face})
    spike = table.index[table.frame == 5_001][0]
    table.loc[spike, "AU02_p"], table.loc[spike, "AU02_c"] = 0.99, 1  # one frame: lost by a plain mean
    line = timeline(table, 0, max_columns=600)
    assert line.binned and line.prob.shape == (600, 3) and len(line.edges) == 601
    assert np.nanmax(line.high[:, 1]) == pytest.approx(0.99) and np.nanmax(line.prob[:, 1]) < 0.5
    assert line.share[1] == pytest.approx(1 / (frames - 1))  # shares count every frame, not columns
    assert line.share[0] == pytest.approx(10 / (frames - 1))
    partly = np.flatnonzero(line.present < 1)
    assert len(partly) == 1 and 0.9 < line.present[partly[0]] < 1 and not line.gap.any()
    assert line.active[:, 1].max() == pytest.approx(1 / 30)  # the spike's column: 1 of its 30 frames on


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_plot_writes_one_valid_image_per_face(two_faces, tmp_path, suffix):
    source = tmp_path / "aus.csv"
    get_writer("csv").write(two_faces, source)
    written = plot_table(source, tmp_path / f"timeline{suffix}")
    assert written == [tmp_path / f"timeline_face0{suffix}", tmp_path / f"timeline_face1{suffix}"]
    for path in written:
        data = path.read_bytes()
        if suffix == ".png":
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                assert image.format == "PNG" and image.width > 1000 and image.height > 400
        elif suffix == ".svg":
            assert ET.fromstring(data).tag == "{http://www.w3.org/2000/svg}svg"
        else:
            assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["aus.csv", *(p.name for p in written)])
    only = plot_table(source, tmp_path / f"one{suffix}", face_id=1)
    assert only == [tmp_path / f"one{suffix}"] and only[0].stat().st_size > 0


def test_drawn_pixels_show_gaps_and_active_spans(two_faces):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    line = timeline(two_faces, 0)
    fig = draw(line)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(int)
    au01 = fig.axes[1]  # axes[0] is the face strip; lanes follow, each with its share panel

    def colour(t: float, y: float) -> np.ndarray:
        x, y = au01.transData.transform((t, y))
        return pixels[int(round(pixels.shape[0] - y)), int(round(x))]

    active = colour(0.5, 0.92)  # frame 15: AU01 on, the line at 0.8 is below
    assert active[0] - active[2] > 60  # orange shading
    quiet = colour(0.2, 0.92)  # frame 6: off
    assert quiet.min() > 240  # white
    gap = colour(1.17, 0.5)  # frame 35: no face 0
    grey = int(GAP[1:3], 16)
    assert abs(gap[0] - gap[2]) < 10 and gap.max() <= grey + 5  # grey fill or hatch, not white


def test_seventeen_aus_and_json_input(tmp_path):
    table = detect_table(OPENFACE, 90, {0: np.ones(90, bool)})
    table.attrs.update(video={"path": "clip.mp4"}, model={"aus": [f"AU{a:02d}" for a in OPENFACE],
                                                          "au_names": ["x"] * 17, "thresholds": [0.5] * 17})
    source = tmp_path / "aus.json"
    get_writer("json").write(table, source)
    line = timeline(read_table(source), 0)
    assert len(line.labels) == 17 and line.thresholds == [0.5] * 17
    # aucli's FACS names win; the table's names fill in only AUs aucli has no name for.
    assert line.names[OPENFACE.index(5)] == "upper lid raiser"
    from aucli.plot import au_name
    assert au_name("AU43", {"AU43": "eyes closed"}) == "eyes closed" and au_name("AU43") == ""
    written = plot_table(source)
    assert written == [tmp_path / "aus.png"]
    with Image.open(written[0]) as image:
        assert image.height > 17 * 40  # a lane per AU stays readable


def test_command_line(two_faces, tmp_path):
    source = tmp_path / "aus.csv"
    get_writer("csv").write(two_faces, source)
    runner = CliRunner()
    done = runner.invoke(app, ["plot", str(source), "--face-id", "1", "-o", str(tmp_path / "f1.svg")])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "f1.svg").is_file() and "wrote" in done.output
    for args, message in [
        (["-o", str(tmp_path / "x.jpg")], "expected .png, .svg or .pdf"),
        (["--face-id", "7"], "the table has face(s) 0, 1"),
    ]:
        done = runner.invoke(app, ["plot", str(source), *args])
        assert done.exit_code != 0 and message in str(done.exception)
    done = runner.invoke(app, ["plot", str(tmp_path / "missing.csv")])
    assert done.exit_code != 0 and "no such file" in str(done.exception)
    not_a_table = tmp_path / "other.csv"
    not_a_table.write_text("a,b\n1,2\n")
    done = runner.invoke(app, ["plot", str(not_a_table)])
    assert done.exit_code != 0 and "not an aucli detect table" in str(done.exception)
    assert not list(tmp_path.glob(".*.part"))  # nothing half-written left behind
