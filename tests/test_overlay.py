"""detect --overlay: the annotated video keeps the source's frames, times and audio,
draws where the faces are, is written atomically, and leaves the AU table unchanged."""

from __future__ import annotations

import av
import numpy as np
import pandas as pd
import pytest
from media_fixtures import VIDEOS, make_video, one_torch_thread, tiny_checkpoint  # noqa: F401 (autouse fixture)
from typer.testing import CliRunner

from aucli.cli import app
from aucli.errors import UsageError
from aucli.overlay import OverlayWriter
from aucli.pipeline import Detector

SOURCE = VIDEOS / "single_face.mp4"  # 72 frames, one face, MP3 audio


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    checkpoint = tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", clip_length=12, k=2)
    return Detector(checkpoint, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def annotated(detector, tmp_path_factory):
    """The sample video through detect with and without --overlay."""
    folder = tmp_path_factory.mktemp("overlay")
    with_overlay = detector.run(SOURCE, overlay=folder / "annotated.mp4")
    return detector.run(SOURCE), with_overlay, folder / "annotated.mp4"


def _frames(path) -> tuple[list[float], list[np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        decoded = [(float((f.pts - start) * stream.time_base), f.to_ndarray(format="rgb24"))
                   for f in container.decode(stream)]
    return [t for t, _ in decoded], [image for _, image in decoded]


def _audio_packets(path) -> list[tuple[float, bytes]]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return [(float(p.pts * p.time_base), bytes(p)) for p in container.demux(stream) if p.size]


def test_overlay_does_not_change_the_results(annotated):
    plain, with_overlay, _ = annotated
    pd.testing.assert_frame_equal(plain, with_overlay)
    assert with_overlay.attrs["summary"]["stages"]["overlay"] > 0


def test_overlay_keeps_frames_timestamps_and_audio(annotated):
    _, table, path = annotated
    source_times, _ = _frames(SOURCE)
    times, images = _frames(path)
    assert len(times) == len(source_times) == len(table) == 72
    assert times == pytest.approx(source_times, abs=1e-9)
    assert images[0].shape == (360, 640, 3)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.codec.canonical_name == "mp3"
    assert _audio_packets(path) == _audio_packets(SOURCE)  # copied, byte for byte and in time


def test_overlay_draws_the_box_where_the_table_puts_the_face(annotated):
    _, table, path = annotated
    _, source = _frames(SOURCE)
    _, drawn = _frames(path)
    for i in (10, 40):
        row = table.iloc[i]
        assert row.success == 1
        x1, y1 = int(round(row.face_x)), int(round(row.face_y))
        x2, y2 = int(round(row.face_x + row.face_w)), int(round(row.face_y + row.face_h))
        middle = slice(y1 + (y2 - y1) // 4, y2 - (y2 - y1) // 4)  # the box's left edge, away from the tag
        edge = np.abs(drawn[i][middle, x1 - 1 : x1 + 2].astype(int) - source[i][middle, x1 - 1 : x1 + 2]).mean()
        # Far from the box and the AU panel beside it, only compression noise differs.
        away = np.abs(drawn[i][-40:, :40].astype(int) - source[i][-40:, :40]).mean()
        assert x1 > 60 and y2 < 320  # the control corner is indeed away from the drawing
        assert edge > 40 and away < 6, (edge, away)


def test_rotation_variable_rate_and_frames_without_faces(detector, tmp_path):
    # Stored 64x48 with a 90-degree display rotation, uneven timestamps, no face anywhere.
    pts = [0, 40, 100, 130, 200, 260, 270, 330, 400, 470]
    source = make_video(tmp_path / "rotated.mp4", pts_ms=pts, rotation=90)
    table = detector.run(source, overlay=tmp_path / "rotated_annotated.mov")
    times, images = _frames(tmp_path / "rotated_annotated.mov")
    assert len(table) == len(times) == 10 and times == pytest.approx([p / 1000 for p in pts], abs=1e-9)
    assert images[0].shape == (64, 48, 3)  # display orientation, no rotation left to apply
    with av.open(str(tmp_path / "rotated_annotated.mov")) as container:
        assert not container.streams.audio
        assert (next(container.decode(video=0)).rotation or 0) == 0
    _, plain = _frames(source)  # the reader rotates, so compare in display orientation
    plain = [np.ascontiguousarray(np.rot90(image)) for image in plain]
    assert np.abs(images[3][:10].astype(int) - plain[3][:10]).mean() > 20  # the "no face" tag at the top
    assert np.abs(images[3][-10:].astype(int) - plain[3][-10:]).mean() < 6


def test_a_failed_run_leaves_no_overlay(detector, tmp_path, monkeypatch):
    added = []

    def fail_on_fifth(self, image, timestamp, faces):
        added.append(timestamp)
        if len(added) == 5:
            raise RuntimeError("disk full")

    monkeypatch.setattr(OverlayWriter, "add", fail_on_fifth)
    source = make_video(tmp_path / "grey.mp4")
    with pytest.raises(RuntimeError, match="disk full"):
        detector.run(source, overlay=tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.mp4"]
    with pytest.raises(UsageError, match="expected a .mp4"):
        detector.run(source, overlay=tmp_path / "out.avi")


def test_command_line(detector, tmp_path):
    (tmp_path / "a").mkdir()
    first = make_video(tmp_path / "a" / "clip.mp4")
    second = make_video(tmp_path / "b.mp4")
    runner = CliRunner()
    done = runner.invoke(app, ["detect", str(first), "-o", str(tmp_path / "aus.csv"), "--overlay",
                               str(tmp_path / "seen.mp4"), "--checkpoint", str(detector.checkpoint), "--device", "cpu"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "aus.csv").is_file() and (tmp_path / "seen.mp4").is_file()
    assert str(tmp_path / "seen.mp4") in done.output  # the summary names it
    done = runner.invoke(app, ["detect", str(first), str(second), "-o", str(tmp_path / "tables"), "--overlay",
                               str(tmp_path / "videos"), "--checkpoint", str(detector.checkpoint), "-q"])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["b.mp4", "clip.mp4"]
    done = runner.invoke(app, ["detect", str(first), str(second), "-o", str(tmp_path / "tables"), "--overlay",
                               str(tmp_path / "one.mp4"), "--checkpoint", str(detector.checkpoint)])
    assert done.exit_code != 0 and "--overlay must be a folder" in str(done.exception)
    done = runner.invoke(app, ["detect", str(second), "--overlay", str(second), "--checkpoint", str(detector.checkpoint)])
    assert done.exit_code != 0 and "would replace the input video" in str(done.exception)
    assert second.stat().st_size > 0
