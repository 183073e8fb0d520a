"""Streaming decode: frame counts, PTS timestamps, rotation, codecs, image sequences, inputs."""

from __future__ import annotations

import shutil

import av
import cv2
import numpy as np
import pytest
from media_fixtures import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    IMAGES,
    SAMPLE_FRAMES,
    VIDEOS,
    make_audio,
    make_video,
    one_torch_thread,
)

from aucli.errors import AucliError
from aucli.video import ImageSequenceReader, VideoReader, expand_input, open_video


def _pts_seconds(path) -> list[float]:
    """Timestamps straight from PyAV, as the independent reference."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = stream.start_time or 0
        return [float((f.pts - start) * stream.time_base) for f in container.decode(stream)]


@pytest.mark.parametrize("name", sorted(SAMPLE_FRAMES))
def test_samples_decode_every_frame_with_pts_timestamps(name):
    with open_video(VIDEOS / name) as reader:
        frames = [(f.index, f.timestamp, f.image.shape) for f in reader]
    assert len(frames) == SAMPLE_FRAMES[name] == reader.decoded
    assert [i for i, _, _ in frames] == list(range(len(frames)))
    timestamps = [t for _, t, _ in frames]
    assert timestamps == pytest.approx(_pts_seconds(VIDEOS / name), abs=1e-9)
    assert all(a < b for a, b in zip(timestamps, timestamps[1:]))
    assert {s for _, _, s in frames} == {(reader.info.height, reader.info.width, 3)}
    assert reader.warnings == []  # no_face.mp4's edit list is not a break


@pytest.mark.parametrize("name", ["WolfgangLanger_Pexels.mp4", "face_noface.mov"])
def test_pixels_equal_pyav_rgb24(name):
    """The reused one-thread RGB converter gives PyAV's own ``to_ndarray(format="rgb24")``
    pixels (H.264 and HEVC)."""
    with av.open(str(VIDEOS / name)) as container:
        stream = container.streams.video[0]
        expected = [f.to_ndarray(format="rgb24") for _, f in zip(range(40), container.decode(stream))]
    with open_video(VIDEOS / name) as reader:
        images = [f.image for _, f in zip(range(40), reader)]
    assert len(images) == len(expected) == 40
    for image, want in zip(images, expected):
        assert image.dtype == np.uint8 and np.array_equal(image, want)


def test_hevc_audio_first_variable_rate():
    path = VIDEOS / "face_noface.mov"
    with av.open(str(path)) as container:
        assert container.streams[0].type == "audio"  # the video stream is not the first
    with open_video(path) as reader:
        timestamps = [f.timestamp for f in reader]
    assert reader.info.codec == "hevc"
    steps = np.round(np.diff(timestamps), 4)
    assert len(set(steps)) > 1  # variable frame rate: not one constant step


def test_edit_list_frames_are_not_presented():
    with open_video(VIDEOS / "no_face.mp4") as reader:
        frames = list(reader)
    assert reader.info.frame_count == 98  # stored samples
    assert len(frames) == 95 and frames[0].timestamp == 0.0


@pytest.mark.parametrize(
    "codec, suffix",
    [("libx264", ".mp4"), ("libvpx-vp9", ".webm"), ("mjpeg", ".avi"), ("mpeg4", ".mkv")],
)
def test_codecs_and_variable_frame_rate(tmp_path, codec, suffix):
    pts = [0, 40, 70, 130, 140, 200, 260, 300, 333, 400]
    path = make_video(tmp_path / f"clip{suffix}", codec, pts)
    with open_video(path) as reader:
        frames = list(reader)
    assert [round(f.timestamp * 1000) for f in frames] == pts
    grey = [int(f.image.mean().round()) for f in frames]
    assert grey == pytest.approx([i * 20 for i in range(10)], abs=6)  # in presentation order


@pytest.mark.parametrize("rotation, bright_edge", [(90, "bottom"), (-90, "top"), (180, "right")])
def test_display_rotation_is_applied(tmp_path, rotation, bright_edge):
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :16] = 255  # a bright band on the left of the stored picture
    path = make_video(tmp_path / "rotated.mp4", frames=[image] * 3, rotation=rotation)
    with open_video(path) as reader:
        frame = next(iter(reader)).image
    assert reader.info.rotation == rotation % 360
    if rotation % 180:
        assert frame.shape[:2] == (64, 48) and (reader.info.width, reader.info.height) == (48, 64)
    edges = {
        "top": frame[:8].mean(), "bottom": frame[-8:].mean(),
        "left": frame[:, :8].mean(), "right": frame[:, -8:].mean(),
    }
    assert max(edges, key=edges.get) == bright_edge


def test_truncated_video_keeps_decoded_frames_and_warns(tmp_path):
    data = (VIDEOS / "WolfgangLanger_Pexels.mp4").read_bytes()  # moov before mdat
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 3])
    with open_video(path) as reader:
        count = sum(1 for _ in reader)
    assert 0 < count < 472
    assert len(reader.warnings) == 1
    assert f"after {count} frames" in reader.warnings[0] and "promised 472" in reader.warnings[0]


def test_image_sequence_folder(tmp_path):
    folder = tmp_path / "seq"
    folder.mkdir()
    for i in (1, 2, 10, 9):  # natural order: 1, 2, 9, 10
        cv2.imwrite(str(folder / f"frame{i}.png"), np.full((20, 30, 3), i * 10, np.uint8))
    assert expand_input(str(folder)) == [folder]
    reader = open_video(folder, fps=10)
    assert isinstance(reader, ImageSequenceReader)
    frames = list(reader)
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [int(f.image[0, 0, 0]) for f in frames] == [10, 20, 90, 100]
    assert reader.info.kind == "images" and reader.info.frame_count == 4


def test_expand_inputs(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    make_video(tmp_path / "a" / "deep" / "one.mp4")
    make_video(tmp_path / "a" / "two.mkv", "mpeg4")
    (tmp_path / "a" / "notes.txt").write_text("not a video")
    assert expand_input(str(tmp_path / "a")) == [tmp_path / "a" / "deep" / "one.mp4", tmp_path / "a" / "two.mkv"]
    assert expand_input(str(tmp_path / "a" / "*.mkv")) == [tmp_path / "a" / "two.mkv"]
    assert expand_input(str(IMAGES)) == [IMAGES]  # images only: one sequence
    (tmp_path / "empty").mkdir()
    for spec, reason in [
        (tmp_path / "empty", "no videos"),
        (tmp_path / "missing.mp4", "no such file"),
        (tmp_path / "*.nothing", "no files match"),
    ]:
        with pytest.raises(AucliError, match=reason) as error:
            expand_input(str(spec))
        assert str(spec) in str(error.value)


def test_bad_files_fail_with_one_line(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    text = tmp_path / "text.mp4"
    text.write_text("hello, this is not a video\n" * 20)
    audio = make_audio(tmp_path / "audio.m4a")
    for path, reason in [
        (empty, "empty file"),
        (text, "not a readable video"),
        (audio, "no video stream"),
        (tmp_path / "gone.mp4", "no such file"),
    ]:
        with pytest.raises(AucliError, match=reason) as error:
            VideoReader(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_decoding_streams_frame_by_frame(tmp_path):
    # The reader is a generator over the container: frames arrive before the end is decoded.
    path = shutil.copy(VIDEOS / "single_face.mp4", tmp_path / "clip.mp4")
    reader = open_video(path)
    frames = iter(reader)
    next(frames)
    assert reader.decoded == 1
    reader.close()
