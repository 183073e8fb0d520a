"""Is bf16 faster on this CPU? Backbone forward speed by precision, layout and BatchNorm folding.

For each backbone (aucli's ResNets, timm's architecture): images/s of a batch-16
forward (224x224) in fp32 and bf16
(weights cast, no autocast), NCHW or channels-last, BatchNorm kept or folded
into the convolutions (aucli.inference.fold_batchnorm), each as a ratio to the
reference (a plain timm ResNet-50, fp32, NCHW, batch 16) timed in the same
rounds. Variants run interleaved, several rounds; the best round is reported,
which is the least disturbed by other load.

    python benchmarks/backbone_precision.py [--backbones resnet18 resnet50] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aucli.inference import fold_batchnorm  # noqa: E402
from aucli.model.resnet import RESNETS  # noqa: E402
from detect_speed import load, machine  # noqa: E402


def variant(model: torch.nn.Module, dtype: torch.dtype, channels_last: bool, folded: bool):
    model = copy.deepcopy(model).eval()
    if folded:
        fold_batchnorm(model)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dtype).to(memory_format=layout)
    batch = torch.randn(16, 3, 224, 224).to(dtype).contiguous(memory_format=layout)
    return model, batch


@torch.inference_mode()
def rate(model: torch.nn.Module, batch: torch.Tensor, repeats: int = 2) -> float:
    model(batch)
    start = time.perf_counter()
    for _ in range(repeats):
        model(batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="*", default=["resnet18", "resnet50"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print(load())
    import timm

    torch.manual_seed(0)
    reference = variant(timm.create_model("resnet50", num_classes=0), torch.float32, False, False)
    for name in args.backbones:
        net = RESNETS[name]()
        variants = {
            (dtype, layout, folded): variant(net, DTYPE[dtype], layout == "channels-last", folded)
            for dtype in ("fp32", "bf16") for layout in ("NCHW", "channels-last") for folded in (False, True)
        }
        best = dict.fromkeys(variants, 0.0)
        best_reference = 0.0
        for _ in range(args.rounds):
            best_reference = max(best_reference, rate(*reference))
            for key, (model, batch) in variants.items():
                best[key] = max(best[key], rate(model, batch))
        print(f"\n{name}, batch 16, best of {args.rounds} rounds; reference ResNet-50 fp32 NCHW: "
              f"{best_reference:.2f} img/s")
        print("| precision | layout | BatchNorm | img/s | x reference |")
        print("|---|---|---|---:|---:|")
        for (dtype, layout, folded), value in best.items():
            print(f"| {dtype} | {layout} | {'folded' if folded else 'kept'} | {value:.1f} "
                  f"| {value / best_reference:.2f} |")
    print(load())


DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}

if __name__ == "__main__":
    main()
