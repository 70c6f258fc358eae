"""Benchmark (not a test): training throughput of the gallery nets vs the fp32 matmul peak.

For each model and precision: img/s of full training steps (forward, backward, SGD) at batch 128 on
1x28x28, achieved GFLOP/s (3 x forward MACs x 2 FLOP per image), and the fraction of the fp32
matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import matmul_peak_gflops, write_result  # noqa: E402


def step_rate(model, x, y, precision: str, steps: int = 20, warmup: int = 5) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(warmup + steps):
        if i == warmup:
            t = time.perf_counter()
        with ac:
            loss = F.cross_entropy(model.classifier(model(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return x.shape[0] * steps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    from cmpnas.config import load_config
    from cmpnas.models.cost import count_macs
    from cmpnas.models.embedding import EmbeddingModel, ModelSpec

    cfg = load_config(args.config)
    models = {
        "default-gallery": (cfg.gallery.backbone, cfg.gallery.backbone_kwargs),
        "cifar_resnet20": ("cifar_resnet20", {}),
        "timm-resnet18-small-input": ("timm:resnet18", {"small_input": True}),
    }
    peak = matmul_peak_gflops()
    peak_bf16 = matmul_peak_gflops(dtype=torch.bfloat16)
    rows = {}
    for name, (backbone, kw) in models.items():
        m = EmbeddingModel(ModelSpec(backbone=backbone, backbone_kwargs=dict(kw))).to(
            memory_format=torch.channels_last
        )
        macs = count_macs(m, (1, 1, 28, 28))
        x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        m.train()
        for precision in ("fp32", "bf16"):
            ips = step_rate(m, x, y, precision)
            gf = 6 * macs * ips / 1e9
            rows[f"{name}/{precision}"] = {
                "macs": macs,
                "img_per_s": round(ips, 1),
                "gflops": round(gf, 1),
                "fraction_of_fp32_matmul_peak": round(gf / peak, 3),
            }
    write_result(
        "training_throughput",
        {
            "fp32_matmul_peak_gflops": round(peak, 1),
            "bf16_matmul_peak_gflops": round(peak_bf16, 1),
            "threads": torch.get_num_threads(),
            "models": rows,
            "target_fraction": 0.6,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
