"""Checkpoints: round trip, metadata, and refusal of anything that is not a safe aucli checkpoint."""

from __future__ import annotations

import pickle

import pytest
import torch

import aucli
from aucli.checkpoint import load_checkpoint, save_checkpoint
from aucli.errors import AucliError
from aucli.model import MDHR


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    model = MDHR("disfa", "resnet_tiny", k=2, feature_dim=32).eval()
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, model, clip_length=8, thresholds=[0.4] * 8, source={"kind": "trained", "dataset": "synthetic", "fold": 1})
    return model, path


def test_round_trip_reproduces_outputs_and_metadata(tiny):
    model, path = tiny
    loaded = aucli.load_model(str(path))
    assert not loaded.training
    meta = loaded.metadata
    assert (meta.au_set, meta.backbone, meta.clip_length, meta.k, meta.feature_dim) == ("disfa", "resnet_tiny", 8, 2, 32)
    assert meta.thresholds == [0.4] * 8 and meta.aus == [1, 2, 4, 6, 9, 12, 25, 26]
    assert meta.source == {"kind": "trained", "dataset": "synthetic", "fold": 1}
    assert meta.aucli_version == aucli.__version__ and meta.input_size == 224
    assert meta.mean == [0.485, 0.456, 0.406] and meta.std == [0.229, 0.224, 0.225]
    x = torch.randn(1, 8, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_loading_skips_the_random_initialisation(tiny):
    """Every tensor comes from the file, so building the model draws no random numbers
    (its initialisation would be thrown away: 0.66 s for a ResNet-50 MDHR); the
    starter's calibration head included."""
    from aucli.checkpoint import STARTER

    _, path = tiny
    for checkpoint in (path, STARTER):
        state = torch.get_rng_state()
        loaded = aucli.load_model(str(checkpoint))
        assert torch.equal(torch.get_rng_state(), state)
        assert all(torch.isfinite(t).all() for t in loaded.state_dict().values())
    assert loaded.video_head is not None
    # Outside loading, modules initialise as before.
    torch.manual_seed(0)
    first = torch.nn.Linear(4, 4).weight.clone()
    torch.manual_seed(0)
    assert torch.equal(torch.nn.Linear(4, 4).weight, first) and first.abs().sum() > 0


def test_checkpoint_is_plain_data(tiny):
    _, path = tiny
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == "aucli-checkpoint" and obj["format_version"] == 1
    assert all(isinstance(v, torch.Tensor) for v in obj["state_dict"].values())


class _Trap:
    def __reduce__(self):
        return (open, ("/tmp/aucli-trap-was-run", "w"))


def test_pickled_code_is_never_run(tmp_path):
    import os

    trap_file = "/tmp/aucli-trap-was-run"
    if os.path.exists(trap_file):
        os.remove(trap_file)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "aucli-checkpoint", "trap": _Trap()}, fh, protocol=2)
    with pytest.raises(AucliError, match="evil.pt.*refuses to load"):
        load_checkpoint(path)
    assert not os.path.exists(trap_file)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"this is text, not a checkpoint\n", r"not a PyTorch file, or a damaged one"),
        (b"PK\x03\x04 truncated zip", r"not a PyTorch file, or a damaged one"),
    ],
)
def test_junk_files_are_refused(tmp_path, content, message):
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(AucliError, match=message):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(AucliError, match="checkpoint not found"):
        aucli.load_model(str(tmp_path / "nope.pt"))


def test_reference_checkpoint_gets_a_hint(tmp_path):
    path = tmp_path / "ref.pth"
    torch.save({"state_dict": {"module.MFD.weight.weight": torch.zeros(4, 64, 1, 1)}}, path)
    with pytest.raises(AucliError, match="convert-official"):
        load_checkpoint(path)


def _rewrite(path, mutate):
    obj = torch.load(path, weights_only=True)
    mutate(obj)
    torch.save(obj, path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o["metadata"].update(backbone="resnet18"), "metadata and tensors disagree"),
        (lambda o: o["metadata"].update(feature_dim=64), "metadata and tensors disagree"),
        (lambda o: o["metadata"].update(au_set="bp4d", aus=list(aucli.aus.BP4D.aus), thresholds=[0.5] * 12), "disagree"),
        (lambda o: o["state_dict"].pop("hsr.gat.bias"), "missing tensor"),
        (lambda o: o["metadata"].update(thresholds=[0.5]), "thresholds"),
        (lambda o: o["metadata"].pop("clip_length"), "lacks clip_length"),
        (lambda o: o["metadata"].update(aus=[1, 2]), "does not match"),
        (lambda o: o.update(format_version=99), "format version"),
    ],
)
def test_inconsistent_checkpoints_fail_with_one_line(tiny, mutate, message):
    _, path = tiny
    _rewrite(path, mutate)
    with pytest.raises(AucliError, match=message) as info:
        aucli.load_model(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("command", ["detect", "convert-official"])
def test_pickled_checkpoint_is_refused_with_aucli_line_only(tmp_path, command):
    # A legacy pickle with protocol 4 made torch warn (two lines) before aucli's message.
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": "aucli-checkpoint", "trap": _Trap()}, fh, protocol=4)
    video = Path(__file__).resolve().parents[1] / "sample_videos" / "videos" / "single_face.mp4"
    args = {"detect": ["detect", str(video), "--checkpoint", str(path), "-o", str(tmp_path / "out.csv")],
            "convert-official": ["convert-official", str(path), "-d", "bp4d", "-o", str(tmp_path / "out.pt")]}
    done = subprocess.run([sys.executable, "-m", "aucli", *args[command]], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 1
    assert done.stderr.endswith("it holds pickled objects, which aucli refuses to load)\n")
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "out.pt").exists()
