"""Backbone starts: local weights files (timm/torchvision and official Swin layouts) and offline ImageNet."""

from __future__ import annotations

import pytest
import timm
import torch

from aucli.errors import AucliError
from aucli.model import MDHR
from aucli.model.backbone import Backbone


def test_local_resnet_weights_file_with_classifier_head(tmp_path):
    source = timm.create_model("resnet18", pretrained=False)  # torchvision/timm names, with fc
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = MDHR("bp4d", "resnet18", backbone_weights=path)
    own = model.backbone.model.state_dict()
    for key, value in own.items():
        torch.testing.assert_close(value, source.state_dict()[key])


def test_official_swin_layout_is_shifted(tmp_path):
    # The official Swin release keeps patch merging at the END of stages 0-2, under {"model": ...}.
    source = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    official = {}
    for key, value in source.state_dict().items():
        if ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        official[key] = value
    assert any(k.startswith("layers.0.downsample.") for k in official)
    path = tmp_path / "swin_tiny_official.pth"
    torch.save({"model": official}, path)
    backbone = Backbone("swin_tiny", weights_file=path)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])


def test_incomplete_weights_file_is_refused(tmp_path):
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    state.pop("layer4.1.conv2.weight")
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(AucliError, match="missing"):
        Backbone("resnet18", weights_file=path)


def test_weights_file_not_found(tmp_path):
    with pytest.raises(AucliError, match="not found"):
        Backbone("resnet18", weights_file=tmp_path / "nope.pth")


def test_pretrained_without_network_says_so(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(AucliError, match=r"resnet18\.tv_in1k.*--backbone-weights"):
        Backbone("resnet18", pretrained=True)


def test_unknown_backbone():
    with pytest.raises(AucliError, match="unknown backbone"):
        Backbone("vgg16")


@pytest.fixture()
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face hub address nothing listens on, and an empty local cache."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port that was just free: connecting is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    return tmp_path / "hub"


def test_pretrained_offline_fails_within_seconds(offline_hub):
    # The hub client retried for about 50 s before giving up.
    import time

    start = time.monotonic()
    with pytest.raises(AucliError, match=r"resnet18\.tv_in1k.*cannot reach 127\.0\.0\.1.*--backbone-weights FILE"):
        Backbone("resnet18", pretrained=True)
    assert time.monotonic() - start < 10


def test_pretrained_weights_are_read_from_the_local_cache_offline(offline_hub):
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", pretrained=False)  # with its ImageNet classifier, as published
    snapshot = offline_hub / "models--timm--resnet18.tv_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    (offline_hub / "models--timm--resnet18.tv_in1k" / "refs").mkdir()
    (offline_hub / "models--timm--resnet18.tv_in1k" / "refs" / "main").write_text("0123abcd")
    backbone = Backbone("resnet18", pretrained=True)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[key])


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet_tiny"])
def test_resnets_are_timms_without_importing_it(name):
    """aucli writes its ResNets out (so detect starts without timm); they must be timm's:
    the same keys in the same order, the same random initialisation to the bit for the
    same seed, the same outputs."""
    from timm.models.resnet import BasicBlock, ResNet

    from aucli.model.resnet import RESNETS

    torch.manual_seed(0)
    if name == "resnet_tiny":
        reference = ResNet(BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=0,
                           zero_init_last=False)
    else:
        reference = timm.create_model(name, pretrained=False, num_classes=0, zero_init_last=False)
    torch.manual_seed(0)
    ours = RESNETS[name]()
    theirs, mine = reference.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert [f["num_chs"] for f in ours.feature_info] == [f["num_chs"] for f in reference.feature_info]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval().forward_features(x)
        got = ours.eval()(x)
    assert torch.equal(got, expected)


def test_detect_does_not_import_timm_or_torchvision(tmp_path):
    """Both import torch._dynamo: seconds of start-up that a ResNet detect run does not need."""
    import subprocess
    import sys

    from media_fixtures import ROOT, tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    code = (
        "import sys; from aucli.pipeline import Detector; from aucli.detect_cli import run_detect; "
        f"Detector({str(checkpoint)!r}, device='cpu'); "
        "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo', 'facenet_pytorch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
