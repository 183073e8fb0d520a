"""The model as detect runs it: precision choice, BatchNorm folding, fp32 and bf16 agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media_fixtures import VIDEOS, one_torch_thread, tiny_checkpoint, tiny_model  # noqa: F401

import aucli.inference as inference
from aucli.errors import UsageError
from aucli.faces import face_to_tensor
from aucli.inference import InferenceModel, fold_batchnorm, resolve_precision
from aucli.model.resnet import BasicBlock, Bottleneck, ResNet
from aucli.pipeline import Detector
from aucli.windows import WindowPredictor, window_positions


@pytest.mark.parametrize(
    "machine, flags, expected",
    [
        ("x86_64", {"avx512f", "avx512_bf16"}, "bf16"),  # e.g. AMD Zen 4, Intel Cooper Lake
        ("x86_64", {"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Intel Sapphire Rapids
        ("x86_64", {"avx2", "fma"}, "fp32"),  # no native bf16: emulated, slower
        ("x86_64", set(), "fp32"),  # no /proc/cpuinfo
        ("aarch64", {"bf16", "asimd"}, "fp32"),  # not measured: stay on fp32
    ],
)
def test_auto_precision_follows_what_the_cpu_reports(monkeypatch, machine, flags, expected):
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(inference.platform, "machine", lambda: machine)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(UsageError, match="--precision fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_cpu_flags_come_from_proc_cpuinfo():
    flags = inference.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        assert flags == frozenset()
        return
    if "flags" in text:
        assert "fpu" in flags or "sse2" in flags


def test_folding_batchnorm_keeps_the_function():
    model = tiny_model(12, 2)  # random BN statistics: a wrong fold shows
    frames = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model.backbone(frames)
        batchnorms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
        fold_batchnorm(model.backbone)
        after = model.backbone(frames)
    assert batchnorms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    for a, b in zip(before.maps, after.maps):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_fused_convolution_relu_gives_the_same_result(block, precision):
    if not inference._ResNetFused.available(torch.device("cpu")):
        pytest.skip("this torch has no oneDNN pointwise convolution")
    torch.manual_seed(0)
    resnet = ResNet(block, (2, 1, 1, 1), (8, 16, 32, 64)).eval()
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    fold_batchnorm(resnet)
    dtype = inference.DTYPES[precision]
    resnet.to(dtype, memory_format=torch.channels_last)
    frames = torch.randn(5, 3, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        x = resnet.maxpool(resnet.act1(resnet.bn1(resnet.conv1(frames))))  # Backbone.forward's ResNet path
        expected = []
        for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
            x = layer(x)
            expected.append(x)
        fused = inference._ResNetFused(resnet)
        first = fused(frames[:3])  # its weights are reordered for batches of 3 ...
        got = fused(frames)  # ... and serve other batch sizes alike
    if hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"):  # else the plain weights serve, and stay
        assert all(conv.weight is None for conv in resnet.modules() if isinstance(conv, torch.nn.Conv2d))
    assert len(got.maps) == 4
    for a, c in zip(got.maps, first.maps):
        assert a.dtype == dtype and torch.equal(c, a[:3])  # the same bits at any batch size
    assert torch.equal(got.tokens, got.maps[-1].flatten(2).transpose(1, 2))
    if precision == "fp32":
        # The residual sum inside the convolution is the same float operation as after it. The
        # same bits where PyTorch's own convolution runs the same oneDNN kernel (Intel Xeon; AMD
        # Zen 4 on 2 threads); on one thread on Zen 4 it takes another kernel and the sums
        # differ by float rounding (measured: up to 9e-6 on values up to ~7).
        for a, b in zip(got.maps, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        # bf16: the sum is rounded once, not after the convolution and again after the
        # addition, so values move by a bf16 step (2**-8 relative) here and there, and those
        # steps carry into the blocks after. A wrong shortcut, bias or stride moves far more.
        moved = 0
        for a, b in zip(got.maps, expected):
            a, b = a.float(), b.float()
            assert (a - b).abs().max() <= 0.02 * b.abs().max(), (a - b).abs().max()
            moved += int((a != b).sum())
        assert moved > 0  # else the fused sum did not run (or rounds as the plain layers do)


def test_runner_uses_the_fused_backbone_on_the_cpu():
    runner = InferenceModel(tiny_model(12, 2), "bf16")
    frames = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    if inference._ResNetFused.available(torch.device("cpu")):
        assert isinstance(runner._backbone, inference._ResNetFused)
    fused_backbone = runner._backbone
    with torch.inference_mode():
        runner._backbone = runner.model.backbone  # before the fused one reorders (and drops) the plain weights
        plain = runner.encode_frames(frames)
        runner._backbone = fused_backbone
        fused = runner.encode_frames(frames)
    # bf16: the residual sums are rounded once in the fused backbone (above), twice in the plain
    # one: within a few bf16 steps of each tensor's scale.
    for a, b in zip([fused.static, *fused.maps], [plain.static, *plain.maps]):
        assert a.dtype == b.dtype
        assert (a.float() - b.float()).abs().max() <= 0.02 * b.float().abs().max()
    assert fused.maps[0].dtype == torch.bfloat16


def test_fused_block_keeps_an_input_it_must_not_overwrite():
    """The residual sum is written into the shortcut's memory: a layer's first block must not
    overwrite the map the layer before returned (when it has no downsampling shortcut)."""
    if not inference._ResNetFused.available(torch.device("cpu")):
        pytest.skip("this torch has no oneDNN pointwise convolution")
    torch.manual_seed(0)
    resnet = ResNet(BasicBlock, (2, 1, 1, 1), (8, 16, 32, 64)).eval()
    fold_batchnorm(resnet)
    resnet.to(memory_format=torch.channels_last)
    block = resnet.layer1[1]
    assert block.downsample is None
    fused = inference._ResNetFused(resnet)
    x = torch.randn(2, 8, 16, 16).relu().contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        before = x.clone()
        kept = fused._block(block, x, overwrite=False)
        assert torch.equal(x, before) and kept.data_ptr() != x.data_ptr()
        taken = fused._block(block, x, overwrite=True)
        fused._sum_in_place = False  # as on a torch without the in-place op: the addition apart
        apart = fused._block(block, before.clone(), overwrite=True)
    assert torch.equal(taken, kept)
    assert torch.equal(apart, kept)  # fp32: the same float operations either way
    if hasattr(torch.ops.mkldnn, "_convolution_pointwise_"):
        assert taken.data_ptr() == x.data_ptr()  # written in place


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_motion_is_kept_in_the_compute_dtype_and_the_head_reads_it_exactly(precision):
    """Projected differences stay in the dtype they were computed in (half the bytes in bf16
    while they wait for their windows); the head takes them to float32 without loss."""
    runner = InferenceModel(tiny_model(12, 2), precision)
    frames = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        codes = runner.encode_frames(frames)
        motion = runner.encode_motion([m[:-1] for m in codes.maps], [m[1:] for m in codes.maps])
        assert motion.dtype == inference.DTYPES[precision]
        assert motion.shape[:2] == (5, 4)
        static = codes.static[None]
        kept, _ = runner.predict_window(static, motion[None])
        widened, _ = runner.predict_window(static, motion.float()[None])
    assert kept.dtype == torch.float32 and torch.equal(kept, widened)


def _predict(runner, faces: np.ndarray, clip_length: int) -> np.ndarray:
    predictor = WindowPredictor(runner, clip_length, face_to_tensor, batch_size=5)
    for i, face in enumerate(faces):
        predictor.add("segment", i, face)
    predictor.flush()
    return np.stack([p for _, p in sorted(predictor.pop_results())])


def test_fp32_runner_matches_the_plain_model_and_bf16_stays_close():
    clip_length, k = 12, 2
    faces = np.random.default_rng(0).integers(0, 256, (20, 64, 64, 3), dtype=np.uint8)
    plain = tiny_model(clip_length, k)
    with torch.inference_mode():
        expected = []
        for i in range(len(faces)):
            window, position = window_positions(i, len(faces), clip_length, k)
            expected.append(plain(face_to_tensor(faces[window])[None])[0, position].numpy())
    expected = np.stack(expected)
    fp32 = InferenceModel(tiny_model(clip_length, k), "fp32")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fp32.model.backbone.modules())
    np.testing.assert_allclose(_predict(fp32, faces, clip_length), expected, atol=1e-5, rtol=0)
    bf16 = InferenceModel(tiny_model(clip_length, k), "bf16")
    assert next(bf16.model.backbone.parameters()).dtype == torch.bfloat16
    assert bf16.model.classifier.prototypes.dtype == torch.float32  # the head stays in fp32
    got = _predict(bf16, faces, clip_length)
    assert got.dtype == np.float32
    difference = np.abs(got - expected)
    assert 0 < difference.max() < 0.01 and difference.mean() < 0.002  # measured: 1.2e-3, 2e-4


def test_detect_precisions_agree_and_are_recorded(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny.pt")
    tables = {
        p: Detector(checkpoint, device="cpu", precision=p).run(VIDEOS / "single_face.mp4") for p in ("fp32", "bf16")
    }
    fp32, bf16 = tables["fp32"], tables["bf16"]
    assert fp32.attrs["model"]["precision"] == "fp32" and bf16.attrs["model"]["precision"] == "bf16"
    assert (fp32["success"] == bf16["success"]).all()
    p_columns = [c for c in fp32.columns if c.endswith("_p")]
    delta = (fp32[p_columns] - bf16[p_columns]).abs().to_numpy()
    assert delta.mean() < 0.01


@pytest.mark.parametrize("au_set", ["bp4d", "disfa", "openface"])
def test_temporal_head_as_detect_runs_it_matches_the_model(au_set):
    """InferenceModel.predict_window (folded BatchNorms, stacked HSR extractors, MFD's
    running-sum pooling) computes MDHR.predict_window: to float rounding in fp32, close in bf16."""
    import copy

    from aucli.model import MDHR

    torch.manual_seed(0)
    model = MDHR(au_set, backbone="resnet_tiny", k=3, feature_dim=32).eval()
    with torch.no_grad():  # BatchNorm statistics away from 0/1, so that folding them matters
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    generator = torch.Generator().manual_seed(1)
    static = torch.randn(2, 11, 49, 32, generator=generator)
    motion = torch.relu(torch.randn(2, 10, 4, model.mfd.width, 7, 7, generator=generator))
    with torch.inference_mode():
        expected, expected_aux = model.predict_window(static, motion)
        fp32 = InferenceModel(copy.deepcopy(model), "fp32")  # it rearranges the model it is given
        got, aux = fp32.predict_window(static, motion)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        for name in expected_aux:
            torch.testing.assert_close(aux[name], expected_aux[name], atol=1e-4, rtol=1e-4)
        bf16 = InferenceModel(copy.deepcopy(model), "bf16")
        close = bf16.predict_window(static, motion)[0]
    difference = (close - expected).abs()
    assert got.shape == expected.shape == (2, 11, model.au_set.num_aus)
    assert 0 < difference.max() < 0.02 and difference.mean() < 0.005
