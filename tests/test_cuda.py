"""CUDA agrees with the CPU. Skipped where no GPU is present (CI never has one).

These tests have not yet run on a GPU: no GPU was available when they were written.
"""

from __future__ import annotations

import pytest
import torch

from aucli.checkpoint import save_checkpoint
from aucli.model import MDHR

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_model_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = MDHR("bp4d", "resnet50").eval()
    clips = torch.randn(2, 11, 3, 224, 224)
    with torch.no_grad():
        cpu_probs, cpu_aux = model(clips, return_aux=True)
        gpu_probs, gpu_aux = model.cuda()(clips.cuda(), return_aux=True)
    torch.testing.assert_close(gpu_probs.cpu(), cpu_probs, atol=1e-4, rtol=0)
    for name in cpu_aux:
        torch.testing.assert_close(gpu_aux[name].cpu(), cpu_aux[name], atol=1e-3, rtol=1e-4)


def test_detect_on_cuda_matches_cpu(tmp_path):
    import aucli
    from media_fixtures import VIDEOS

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, MDHR("bp4d", "resnet_tiny", k=2, feature_dim=64), clip_length=8)
    video = VIDEOS / "single_face.mp4"
    cpu = aucli.detect(str(video), checkpoint=str(ckpt), device="cpu")
    gpu = aucli.detect(str(video), checkpoint=str(ckpt), device="cuda")
    assert len(cpu) == len(gpu) == 72
    assert (cpu["success"] == gpu["success"]).all()
    prob_columns = [c for c in cpu.columns if c.endswith("_p")]
    assert (cpu[prob_columns] - gpu[prob_columns]).abs().max().max() <= 2e-3
