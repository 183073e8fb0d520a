"""`aucli prepare videos`: labelled videos -> the standard layout, then train and eval on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aucli.data.layout import load_split, resolve_format
from aucli.data.prepare import prepare, split_persons
from aucli.data.raw import label_au_set
from aucli.errors import AucliError

SLICE = Path(__file__).resolve().parent / "data" / "distill_slice"
PERSON_OF = {"spectre__oza6jryjvqs_00004": "spectre__oza6jryjvqs_00004",
             "spectre__pbgb2tayhio_00007": "spectre__pbgb2tayhio_00007",
             "styletalk__furious_talk2_clip1": "styletalk_furious_talk2",
             "styletalk__furious_talk2_clip2": "styletalk_furious_talk2"}


UNSUCCESSFUL = ("spectre__oza6jryjvqs_00004", [3, 4])  # frames where the fixture says OpenFace lost the face


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    labels = root / "labels"
    shutil.copytree(SLICE / "labels", labels)
    clip, rows = UNSUCCESSFUL
    table = pd.read_csv(labels / f"{clip}.csv")
    table.loc[rows, "success"] = 0
    table.to_csv(labels / f"{clip}.csv", index=False)
    out = root / "data"
    prepare("videos", source=SLICE / "videos", labels=labels, output=out,
            index=SLICE / "corpus.csv", test_fraction=0.3, seed=0)
    return out


def test_layout_labels_and_person_split(prepared):
    info = json.loads((prepared / "aucli_dataset.json").read_text())
    assert info["au_set"] == "openface" and info["folds"] == [1]
    assert resolve_format("videos", prepared).au_set == "openface"
    train, test = (load_split(prepared, "videos", s, 1) for s in ("train", "test"))
    assert len(train) + len(test) == 27 + 35 + 60 + 60
    # Persons never straddle the split; the two clips of one person stay together.
    assert not set(train.subjects) & set(test.subjects)
    assert {"styletalk_furious_talk2"} <= set(train.subjects) | set(test.subjects)
    # Labels are the teacher's AUxx_c columns, row for row, in frame order.
    for split in (train, test):
        for video in split.videos():
            person, clip = split.paths[video.start].split("/")[:2]
            assert PERSON_OF[clip] == person
            table = pd.read_csv(SLICE / "labels" / f"{clip}.csv")
            expected = table[[f"{a}_c" for a in split.au_set.labels]].to_numpy().astype(np.int64)
            if clip == UNSUCCESSFUL[0]:
                expected[UNSUCCESSFUL[1]] = 9
            np.testing.assert_array_equal(split.labels[list(video)], expected)
            assert split.image_path(video.start).is_file()
    assert train.labels.shape[1] == 17


def test_unsuccessful_frames_are_unknown(prepared):
    clip, rows = UNSUCCESSFUL
    for split in (load_split(prepared, "videos", s, 1) for s in ("train", "test")):
        frames = [i for i, p in enumerate(split.paths) if f"/{clip}/" in p]
        if frames:
            assert all((split.labels[frames[r]] == 9).all() for r in rows)
            assert set(np.unique(split.labels[frames[rows[-1] + 1]])) <= {0, 1}
            assert (split.sub_labels[frames[rows[0]]] == -1).all()
            return
    pytest.fail(f"{clip} is in neither list")


def test_count_mismatch_is_one_line_error_naming_the_file(tmp_path):
    labels = tmp_path / "labels"
    shutil.copytree(SLICE / "labels", labels)
    file = labels / "styletalk__furious_talk2_clip2.csv"
    pd.read_csv(file).iloc[:-1].to_csv(file, index=False)
    with pytest.raises(AucliError, match="styletalk__furious_talk2_clip2.csv: 59 label rows.*60 frames") as err:
        prepare("videos", source=SLICE / "videos", labels=labels, output=tmp_path / "out", seed=0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "VIDEOS_train_img_path_fold1.txt").exists()


def test_au_set_from_columns_and_person_split():
    columns = ["frame", "success"] + [f"AU{a:02d}_c" for a in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23,
                                                                 25, 26, 28, 45)]
    assert label_au_set(columns) == "openface"
    assert label_au_set([c for c in columns if c != "AU45_c"]) == "disfa"
    with pytest.raises(AucliError):
        label_au_set(["frame", "AU01_c"])
    persons = [f"p{i}" for i in range(20)]
    train, empty, test = split_persons(persons, 0.15, seed=3)
    assert len(test) == 3 and not empty and sorted(train + test) == sorted(persons)
    assert split_persons(persons, 0.15, seed=3) == [train, empty, test]
    parts = split_persons(persons, None, seed=3)
    assert sorted(sum(parts, [])) == sorted(persons) and {len(p) for p in parts} <= {6, 7}


def test_train_and_eval_on_prepared_videos(prepared, tmp_path):
    from aucli.evaluate import evaluate_checkpoint
    from aucli.train import TrainConfig, train

    cfg = TrainConfig(dataset="videos", data_root=str(prepared), backbone="resnet_tiny", feature_dim=64,
                      clip_length=6, k=2, batch_size=2, epochs=2, clips_per_video=2, lr=5e-3, flip=False,
                      color_jitter=0.0, val_interval=1, select_on_test=True, workers=0,
                      project=str(tmp_path / "runs"), name="t")
    result = train(cfg, quiet=True)
    config = json.loads((Path(result["run_dir"]) / "config.json").read_text())
    assert config["iters_per_epoch"] == 2 * len(load_split(prepared, "videos", "train", 1).videos()) // 2
    evaluated = evaluate_checkpoint(Path(result["run_dir"]) / "best.pt")
    assert evaluated.metrics.aus == [f"AU{a:02d}" for a in (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 17, 20, 23, 25,
                                                            26, 45)]
    assert evaluated.metrics.mean_f1 == pytest.approx(result["test"]["mean_f1"], abs=1e-6)


def test_pretrain_then_train_from_its_backbone(prepared, tmp_path):
    """`aucli pretrain` learns a backbone from single frames; `train --backbone-weights` starts from it."""
    import torch

    from aucli.checkpoint import load_tensors
    from aucli.model import MDHR
    from aucli.pretrain import PretrainConfig, pretrain
    from aucli.train import TrainConfig, train

    cfg = PretrainConfig(data_root=str(prepared), backbone="resnet_tiny", size=48, batch_size=16, epochs=2,
                         lr=5e-3, warmup_steps=2, workers=0, project=str(tmp_path / "pre"), name="p")
    result = pretrain(cfg, quiet=True)
    log = [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert len(log[0]["val"]["f1"]) == 17
    saved = load_tensors(result["backbone"])
    assert saved["source"]["epoch"] == result["best"]["epoch"]
    model = MDHR("openface", backbone="resnet_tiny", feature_dim=64, k=2, backbone_weights=result["backbone"])
    for key, value in saved["model"].items():
        assert torch.equal(model.backbone.model.state_dict()[key], value), key
    # A fresh model differs, so the equality above says the file was loaded.
    fresh = MDHR("openface", backbone="resnet_tiny", feature_dim=64, k=2).backbone.model.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in saved["model"].items())

    trained = train(TrainConfig(dataset="videos", data_root=str(prepared), backbone="resnet_tiny", feature_dim=64,
                                clip_length=6, k=2, batch_size=2, epochs=1, backbone_weights=result["backbone"],
                                select_on_test=True, workers=0, project=str(tmp_path / "runs"), name="t"),
                    quiet=True)
    assert (Path(trained["run_dir"]) / "best.pt").is_file()


def test_pretrain_resumes_to_the_uninterrupted_result(prepared, tmp_path):
    import torch

    from aucli.checkpoint import load_tensors
    from aucli.pretrain import PretrainConfig, pretrain

    def config(name):
        return PretrainConfig(data_root=str(prepared), backbone="resnet_tiny", size=40, batch_size=16, epochs=2,
                              warmup_steps=2, workers=0, project=str(tmp_path), name=name)

    whole = pretrain(config("whole"), quiet=True)
    cut = pretrain(config("cut"), stop_after=1, quiet=True)
    assert cut["stopped_at"] == 1 and not (Path(cut["run_dir"]) / "results.json").exists()
    resumed = pretrain(config("ignored"), resume=Path(cut["run_dir"]) / "last.pt", quiet=True)
    assert resumed["run_dir"] == cut["run_dir"]
    a = load_tensors(Path(whole["run_dir"]) / "last.pt")["model"]
    b = load_tensors(Path(cut["run_dir"]) / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_calibrate_fits_a_head_that_eval_and_detect_use(prepared, tmp_path):
    """`aucli calibrate` on a trained checkpoint: the head is fitted on the training people, its
    thresholds tuned on held-out ones; eval reports what the head gives, detect runs it."""
    import subprocess
    import sys

    import torch

    from aucli.checkpoint import load_model
    from aucli.evaluate import evaluate_checkpoint
    from aucli.train import TrainConfig, train

    cfg = TrainConfig(dataset="videos", data_root=str(prepared), backbone="resnet_tiny", feature_dim=64,
                      clip_length=6, k=2, batch_size=2, epochs=1, clips_per_video=1, lr=5e-3, flip=False,
                      color_jitter=0.0, val_interval=1, select_on_test=True, workers=0,
                      project=str(tmp_path / "runs"), name="t")
    best = Path(train(cfg, quiet=True)["run_dir"]) / "best.pt"
    out = tmp_path / "calibrated.pt"
    cli = [sys.executable, "-m", "aucli", "calibrate", "-c", str(best), "-o", str(out), "--hog-components", "8",
           "--fhog-components", "6", "--epochs", "5", "--val-fraction", "0.5", "--workers", "0"]
    wrong = subprocess.run([*cli, "--fhog-absolute", "7"], capture_output=True, text=True, timeout=600)
    assert wrong.returncode != 0 and wrong.stderr.count("\n") == 1 and "--fhog-absolute 7" in wrong.stderr
    assert "running the model" not in wrong.stderr and not out.exists()  # refused before any work
    even = subprocess.run([*cli, "--vote", "4"], capture_output=True, text=True, timeout=600)
    assert even.returncode != 0 and even.stderr.count("\n") == 1 and "--vote 4" in even.stderr
    assert "running the model" not in even.stderr and not out.exists()
    done = subprocess.run(cli, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "validation mean F1" in done.stderr and str(out) in done.stderr
    again = subprocess.run(cli, capture_output=True, text=True, timeout=600)  # never overwrites
    assert again.returncode != 0 and "already exists" in again.stderr and again.stderr.count("\n") == 1

    model = load_model(out)
    head = model.video_head
    assert head.hog_components == 8 and head.fhog_components == 6 and head.num_aus == 17
    assert head.fhog_absolute == 6  # the default, 128, is more than there are components
    assert head.vote == 7  # OpenFace's seven-frame vote, by default
    stored = torch.load(out, map_location="cpu", weights_only=True)
    assert stored["video_head"]["state_dict"]["hog_basis"].dtype == torch.float16
    assert stored["video_head"]["state_dict"]["fhog_basis"].dtype == torch.float16
    plain = load_model(best)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    record = stored["metadata"]["source"]["video_head"]
    assert record["hog_components"] == 8 and record["fhog_components"] == 6 and record["epochs"] == 5
    assert record["fhog_absolute"] == 6 and record["vote"] == 7
    assert record["fitted_on"] == "training people" and "val_mean_f1_without" in record
    train_people = set(load_split(prepared, "videos", "train", 1).subjects)
    assert set(record["val_subjects"]) < train_people  # held out from the training people, never test

    # Calibrating again compares with the head the checkpoint already has, on the same validation
    # frames and with its thresholds: the figure the first calibration reported for it.
    twice = tmp_path / "twice.pt"
    done = subprocess.run([*cli[:5], str(out), "-o", str(twice), *cli[8:]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "with the checkpoint's previous head" in done.stderr and "without" not in done.stderr
    second = torch.load(twice, map_location="cpu", weights_only=True)["metadata"]["source"]["video_head"]
    assert second["val_mean_f1_previous_head"] == pytest.approx(record["val_mean_f1"], abs=1e-9)
    assert "val_mean_f1_without" not in second

    with_head, without = evaluate_checkpoint(out), evaluate_checkpoint(best)
    assert with_head.metrics.thresholds == [float(t) for t in model.metadata.thresholds]
    assert with_head.metrics.f1 != without.metrics.f1  # eval ran the head, not MDHR alone

    video = Path(__file__).resolve().parent.parent / "sample_videos" / "videos" / "single_face.mp4"
    rows = tmp_path / "aus.csv"
    done = subprocess.run([sys.executable, "-m", "aucli", "detect", str(video), "-o", str(rows),
                           "--checkpoint", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(rows)
    assert len(table) == 72 and {f"AU{a:02d}_p" for a in (1, 45)} <= set(table.columns)
