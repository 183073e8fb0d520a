"""MDHR: shapes, ranges, gradients and eval-mode independence of the batch."""

from __future__ import annotations

import pytest
import torch

from aucli.aus import BP4D, DISFA
from aucli.model import MDHR


def _clips(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((b, t, 3, 224, 224), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("au_set", [BP4D, DISFA], ids=lambda s: s.name)
def test_resnet50_shapes_and_range(au_set):
    torch.manual_seed(0)
    model = MDHR(au_set, "resnet50").eval()
    with torch.no_grad():
        probs, aux = model(_clips(1, 11), return_aux=True)
    assert probs.shape == (1, 11, au_set.num_aus)
    assert probs.min() >= 0 and probs.max() <= 1
    assert list(aux) == au_set.branch_names
    for branch, logits in zip(au_set.branches, aux.values()):
        assert logits.shape == (1, 11, branch.num_classes)
    assert torch.equal(model(_clips(1, 11)), probs) if not torch.is_grad_enabled() else True


@pytest.mark.slow
@pytest.mark.parametrize("au_set", [BP4D, DISFA], ids=lambda s: s.name)
def test_swin_base_shapes_and_range(au_set):
    model = MDHR(au_set, "swin_base").eval()
    with torch.no_grad():
        probs, aux = model(_clips(1, 11), return_aux=True)
    assert probs.shape == (1, 11, au_set.num_aus)
    assert 0 <= probs.min() and probs.max() <= 1
    assert [a.shape[-1] for a in aux.values()] == au_set.aux_classes


def test_swin_tiny_shapes():
    model = MDHR(DISFA, "swin_tiny", k=2, feature_dim=64).eval()
    with torch.no_grad():
        probs = model(_clips(2, 5))
    assert probs.shape == (2, 5, 8) and 0 <= probs.min() and probs.max() <= 1


def test_clip_shorter_than_2k_plus_1_is_refused():
    model = MDHR(BP4D, "resnet_tiny", k=3, feature_dim=32).eval()
    from aucli.errors import AucliError

    with pytest.raises(AucliError, match="at least 7 frames"):
        model(_clips(1, 6))


@pytest.mark.parametrize("au_set", [BP4D, DISFA], ids=lambda s: s.name)
def test_every_parameter_gets_a_gradient(au_set):
    torch.manual_seed(0)
    model = MDHR(au_set, "resnet_tiny", k=2, feature_dim=64).train()
    probs, aux = model(_clips(2, 6), return_aux=True)
    labels = torch.randint(0, 2, probs.shape).float()
    loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), labels)
    for logits in aux.values():
        target = torch.randint(0, logits.shape[-1], logits.shape[:2])
        loss = loss + 0.01 * torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


def test_eval_outputs_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = MDHR(BP4D, "resnet_tiny", k=2, feature_dim=64).eval()
    clips = _clips(3, 7, seed=3)
    with torch.no_grad():
        together, aux_together = model(clips, return_aux=True)
        for b in range(3):
            alone, aux_alone = model(clips[b : b + 1], return_aux=True)
            torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=0)
            for name in aux_alone:
                torch.testing.assert_close(aux_alone[name][0], aux_together[name][b], atol=1e-4, rtol=1e-5)


def test_sliding_window_stages_compose_to_forward():
    torch.manual_seed(0)
    model = MDHR(DISFA, "resnet_tiny", k=2, feature_dim=64).eval()
    clip = _clips(1, 6, seed=5)
    with torch.no_grad():
        direct = model(clip)
        codes = model.encode_frames(clip[0])
        # Pairs computed one at a time, as a streaming caller would.
        motion = torch.cat(
            [model.encode_motion([m[i : i + 1] for m in codes.maps], [m[i + 1 : i + 2] for m in codes.maps]) for i in range(5)]
        )
        staged, _ = model.predict_window(codes.static[None], motion[None])
    torch.testing.assert_close(staged, direct, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_temporal_pool_is_the_reference_avgpool3d(k):
    """MFD pools by summing shifted slices (faster); the reference's AvgPool3d, zero
    padding and divisor 2k included, must come out to the bit (spec §2.3)."""
    from aucli.model.mfd import MFD

    x = torch.randn(2, 2 * k + 7, 8, 7, 7, generator=torch.Generator().manual_seed(k))
    expected = torch.nn.functional.avg_pool3d(
        x.transpose(1, 2), (2 * k, 1, 1), stride=1, padding=(k, 0, 0)
    ).transpose(1, 2)
    got = MFD(c1=1, out_features=4, k=k).temporal_pool(x)
    assert got.shape == (2, 2 * k + 8, 8, 7, 7)
    assert torch.equal(got, expected)
