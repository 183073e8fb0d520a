"""The standard layout, clip sampling, augmentation, metrics and synthetic data (spec §5.4, §6.3, §6.4, §7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from aucli.aus import get_au_set
from aucli.data.clips import EvalClips, TrainClips, VideoClipSampler, eval_clip_windows
from aucli.data.layout import derive_sub_labels, fold_subjects, get_format, load_split, write_split
from aucli.data.transforms import ClipAugment, color_jitter
from aucli.errors import AucliError
from aucli.evaluate import au_metrics, confusion, scores, tune_thresholds

BP4D = get_au_set("bp4d")


def _image(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((256, 256, 3), value, np.uint8)).save(path)


@pytest.fixture()
def bp4d_root(tmp_path):
    """A tiny BP4D-named layout: two subjects, two tasks; F002/T1 has a gap after frame 12."""
    rng = np.random.default_rng(0)
    paths = [f"F001/T1/{n}.jpg" for n in range(5, 25)] + [f"F001/T2/{n}.jpg" for n in range(1, 12)]
    paths += [f"F002/T1/{n}.jpg" for n in list(range(1, 13)) + list(range(20, 30))]
    for i, p in enumerate(paths):
        _image(tmp_path / "img" / p, i % 250)
    labels = rng.integers(0, 2, (len(paths), 12))
    labels[3, 5] = 9
    write_split(tmp_path, "bp4d", "train", 1, paths, labels)
    write_split(tmp_path, "bp4d", "test", 1, paths, labels)
    return tmp_path, paths, labels


def test_layout_roundtrip_and_derived_files(bp4d_root):
    root, paths, labels = bp4d_root
    split = load_split(root, "bp4d", "train", 1)
    assert split.paths == paths and (split.labels == labels).all()
    # The weight file holds spec §5.4's formula; removing files makes aucli derive the same values.
    weights = np.array((root / "BP4D_train_weight_fold1.txt").read_text().split(), float)
    assert np.allclose(weights, BP4D.loss_weights(labels), atol=1e-6)
    sub = split.sub_labels.copy()
    (root / "BP4D_train_weight_fold1.txt").unlink()
    (root / "BP4D_train_sub_label_fold1.txt").unlink()
    derived = load_split(root, "bp4d", "train", 1)
    assert (derived.sub_labels == sub).all() and derived.weights is None
    assert np.allclose(derived.loss_weights(), weights, atol=1e-6)
    # The unknown AU10 label (branch down2) leaves that branch's class unknown; others are MSB-first codes.
    assert sub[3, 3] == -1
    row = labels[0]
    assert sub[0, 0] == 8 * row[0] + 4 * row[1] + 2 * row[2] + row[4]


def test_layout_errors_are_one_line(bp4d_root, tmp_path_factory):
    root, paths, _ = bp4d_root
    with pytest.raises(AucliError, match="data root not found"):
        load_split(root / "nope", "bp4d", "train", 1)
    with pytest.raises(AucliError, match="DISFA_train_path_fold1.txt not found"):
        load_split(root, "disfa", "train", 1)
    label_file = root / "BP4D_test_label_fold1.txt"
    label_file.write_text("\n".join(label_file.read_text().splitlines()[:-2]) + "\n")
    with pytest.raises(AucliError, match="label rows for .* image paths"):
        load_split(root, "bp4d", "test", 1)


def test_released_disfa_naming_and_crlf(tmp_path):
    paths = [f"SN003/SN003_{i}.png" for i in range(20)] + [f"SN004/SN004_{i}.png" for i in range(15)]
    for p in paths:
        _image(tmp_path / "img_o" / p, 10)
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "DISFA_train_path_fold2.txt").write_text("".join(p + "\r\n" for p in paths))
    (tmp_path / "list" / "DISFA_train_label_fold2.txt").write_text("0 1 0 0 0 1 1 0\n" * len(paths))
    split = load_split(tmp_path, "disfa", "train", 2)
    assert split.paths[0] == "SN003/SN003_0.png" and split.image_path(0).is_file()
    # DISFA cuts videos at the subject only (spec §7.3).
    assert [len(v) for v in split.videos()] == [20, 15]
    assert split.sub_labels[0].tolist() == [2, 0, 6]  # up 4*AU1+2*AU2+AU4, mid, down 4*AU12+2*AU25+AU26


def test_video_splitting_rules(bp4d_root):
    root, _, _ = bp4d_root
    split = load_split(root, "bp4d", "test", 1)
    # Training: subject/task only (spec §7.3). Test: also where frame numbers jump (§7.4).
    assert [len(v) for v in split.videos()] == [20, 11, 22]
    assert [len(v) for v in split.videos(split_on_gap=True)] == [20, 11, 12, 10]


def test_test_clips_pad_with_last_frame(bp4d_root):
    root, _, labels = bp4d_root
    split = load_split(root, "bp4d", "test", 1)
    windows = eval_clip_windows(split, 8)
    # 20 -> 8+8+4, 11 -> 8+3, 12 -> 8+4, 10 -> 8+2: 9 clips, never spanning two videos.
    assert len(windows) == 9
    assert sum(sum(real) for _, real in windows) == len(split)
    clips = EvalClips(split, 8)
    item = clips[2]  # frames 16..19 of F001/T1 then 4 copies of frame 19
    assert item["frames"].tolist() == [16, 17, 18, 19, 19, 19, 19, 19]
    assert item["real"].tolist() == [True] * 4 + [False] * 4
    assert (item["labels"][4:] == -1).all() and (item["labels"][:4].numpy() == labels[16:20]).all()
    assert (item["sub_labels"][4:] == item["sub_labels"][3]).all()
    assert item["clips"].shape == (8, 3, 224, 224)
    assert torch.allclose(item["clips"][4], item["clips"][3])


def test_sampler_one_window_per_video_deterministic_and_sharded():
    lengths = [30, 9, 50, 16, 40]
    sampler = VideoClipSampler(lengths, 16, seed=3)
    sampler.set_epoch(2)
    epoch = list(sampler)
    assert sorted(r.video for r in epoch) == [0, 1, 2, 3, 4]
    assert all(0 <= r.start <= max(lengths[r.video] - 16, 0) for r in epoch)
    assert epoch == list(sampler)  # a function of (seed, epoch) only
    sampler.set_epoch(3)
    assert epoch != list(sampler)
    shards = [VideoClipSampler(lengths, 16, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for s in shards:
        s.set_epoch(2)
    got = [list(s) for s in shards]
    assert len(got[0]) == len(got[1]) == 3
    assert {r.video for r in got[0] + got[1]} == set(range(5))


def test_train_clips_short_video_padded(bp4d_root):
    root, _, _ = bp4d_root
    split = load_split(root, "bp4d", "train", 1)
    data = TrainClips(split, 16)
    req = next(r for r in VideoClipSampler([len(v) for v in data.videos], 16) if r.video == 1)  # 11 frames
    item = data[req]
    assert item["real"].sum() == 11 and (item["labels"][11:] == -1).all()
    assert item["clips"].shape == (16, 3, 224, 224)


def test_augmentation_shared_by_all_frames():
    aug = ClipAugment()
    params = [aug.draw(torch.Generator().manual_seed(s)) for s in range(200)]
    assert {p.x for p in params} <= set(range(33)) and {0, 32} <= {p.x for p in params} | {0, 32}
    assert 0.6 <= min(p.brightness for p in params) and max(p.saturation for p in params) <= 1.4
    assert any(p.flip for p in params) and not all(p.flip for p in params)
    frame = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    clip = aug(frame.repeat(4, 1, 1, 1), params[0])
    assert clip.shape == (4, 3, 224, 224)
    assert all(torch.equal(clip[0], clip[i]) for i in range(4))  # identical frames stay identical


def test_color_jitter_matches_torchvision():
    import torchvision.transforms.v2.functional as TF

    frames = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    want = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(frames.float() / 255, 1.3), 0.7), 1.2)
    assert torch.allclose(color_jitter(frames, 1.3, 0.7, 1.2), want, atol=1e-5)


def test_metrics_pooled_and_ignore_unknown():
    labels = np.array([[1, 0], [1, 1], [0, 9], [-1, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.4, 0.7], [0.6, 0.9], [0.9, 0.1], [0.1, 0.6]])
    counts = confusion(probs, labels, [0.5, 0.5])
    assert counts.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]  # TP FP FN TN; the 9 and -1 entries are ignored
    f1, acc = scores(counts)
    assert np.allclose(f1, 0.5) and np.allclose(acc, 0.5)
    m = au_metrics(get_au_set("bp4d"), np.zeros((3, 12)), np.zeros((3, 12), int))
    assert m.mean_f1 == 0.0 and m.mean_accuracy == 100.0
    assert tune_thresholds(np.array([[0.3], [0.35], [0.1]]), np.array([[1], [1], [0]])) == [0.15]


def test_fold_subjects_follow_spec_order():
    parts = get_format("bp4d").parts
    train, test = fold_subjects(parts, 1)
    assert test[:2] == ["F007", "F015"] and len(test) == 13 and train[0] == "F001" and len(train) == 28
    assert fold_subjects(parts, 3)[1][0] == "F001"
    disfa_train, disfa_test = fold_subjects(get_format("disfa").parts, 2)
    assert disfa_test[0] == "SN013" and disfa_train[:1] == ["SN002"] and disfa_train[9] == "SN003"


def test_sub_labels_unknown_bits():
    labels = np.zeros((1, 12), int)
    labels[0, 0] = 9  # AU1 unknown -> the up branch is unknown, the rest are known
    assert derive_sub_labels(BP4D, labels).tolist() == [[-1, 0, 0, 0]]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from aucli.data.synthetic import SyntheticSpec, ensure_synthetic

    return ensure_synthetic(tmp_path_factory.mktemp("synthetic") / "data",
                            SyntheticSpec(variants=1, videos_per_subject=1, frames_per_video=24))


def test_synthetic_layout_folds_and_determinism(synthetic_root, tmp_path):
    from aucli.data.synthetic import SyntheticSpec, ensure_synthetic

    meta = json.loads((synthetic_root / "synthetic.json").read_text())
    people = meta["people"]
    for fold in (1, 2, 3):
        train = load_split(synthetic_root, "synthetic", "train", fold)
        test = load_split(synthetic_root, "synthetic", "test", fold)
        # Subject-independent by person, not only by subject id.
        assert not {people[s] for s in train.subjects} & {people[s] for s in test.subjects}
        assert len(train) + len(test) == 24 * len(people)
    split = load_split(synthetic_root, "synthetic", "test", 1)
    rates = (split.labels == 1).mean(0)
    assert rates.max() > 0.1
    image = np.asarray(Image.open(split.image_path(0)))
    assert image.shape == (256, 256, 3)
    # Same spec, same seed: the same frames and labels.
    again = ensure_synthetic(tmp_path / "again", SyntheticSpec(variants=1, videos_per_subject=1, frames_per_video=24))
    assert (again / "SYNTH_test_label_fold1.txt").read_text() == (synthetic_root / "SYNTH_test_label_fold1.txt").read_text()
    assert np.array_equal(np.asarray(Image.open(again / "img" / split.paths[5])),
                          np.asarray(Image.open(split.image_path(5))))
