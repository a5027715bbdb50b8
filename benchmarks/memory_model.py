"""The memory model behind planned batch sizes (``nnunetv2/model/memory.py``), against measured GPU peaks.

Prints, for each calibration row, the modelled peak of a training step next to the peak measured earlier on an
H200 (``torch.cuda.max_memory_allocated``; the figures are in ``MEASURED`` with where they come from), and with
``--measure`` on a CUDA machine measures the row again. Then the batch sizes ``nnUNetv2_plan_vit.py`` plans for
ViT-S and ViT-L DPT at 512x512 for memory targets of 8, 24 and 70 GB, before nnU-Net's minimum batch and a
dataset's 5% cap (its planner applies both).

    .venv/bin/python benchmarks/memory_model.py             # the model only: any machine, seconds
    python benchmarks/memory_model.py --measure             # and measured peaks (CUDA)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnunetv2.model.memory import AUTOCAST_DTYPES, training_memory  # noqa: E402
from nnunetv2.vit.config import ViTConfig, build_model, quiet_model_logs, validate_config  # noqa: E402

GIB = 2 ** 30
LIGHT_NECK = {"neck_hidden_sizes": [256, 512, 1024, 1024]}  # [E/4, E/2, E, E] for ViT-L


@dataclass
class Row:
    name: str
    size: int
    batch: int
    decoder: Dict = field(default_factory=dict)
    precision: str = "bf16"
    lora: bool = False
    gradient_checkpointing: bool = False
    backbone_size: str = "large"
    measured_gib: Tuple[float, ...] = ()  # H200 peaks measured before (ARCHITECTURE.md "Measured so far")

    def config(self) -> ViTConfig:
        return validate_config({"model": {"model_path": "nnunetv2.model.model_dpt", "backbone": "dinov3",
                                          "backbone_size": self.backbone_size, "pretrained": False,
                                          "decoder": self.decoder},
                                "lora": {"enabled": self.lora}, "train": {"optimizer": "adamw"}})


# ViT-L/16 DINOv3 DPT, AdamW. First figure: benchmark.py on an H200 on 2026-11-27 (fused AdamW, code as now);
# second: the earlier H200 runs of ARCHITECTURE.md's first table (plain AdamW, seed-era code).
MEASURED = [
    Row("seed neck [E]*4", 512, 4, measured_gib=(10.8,)),
    Row("seed neck, fp32", 512, 4, precision="fp32", measured_gib=(16.1,)),
    Row("neck [E/4,E/2,E,E]", 512, 4, LIGHT_NECK, measured_gib=(11.7,)),
    Row("seed neck, LoRA r8 qkv", 512, 4, lora=True, measured_gib=(7.4,)),
    Row("neck [E/4..], 1024x1024", 1024, 3, LIGHT_NECK, measured_gib=(22.0, 23.5)),
    Row("neck [E/4..], 1024x1024, grad ckpt", 1024, 3, LIGHT_NECK, gradient_checkpointing=True,
        measured_gib=(10.1, 11.6)),
]


def modelled(row: Row):
    config = row.config()
    with quiet_model_logs():
        return training_memory(lambda: build_model(config, 3, 2, load_weights=False), 3, (row.size, row.size),
                               row.precision, "adamw", row.gradient_checkpointing)


def measure(row: Row, steps: int = 3) -> float:
    """Peak GiB of ``steps`` training steps (forward, backward, fused AdamW) of the row's model on the GPU."""
    device = torch.device("cuda")
    with quiet_model_logs():
        model = build_model(row.config(), 3, 2, load_weights=False).to(device).train()
    if row.gradient_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-4, fused=True)
    dtype = AUTOCAST_DTYPES[row.precision]
    x = torch.randn(row.batch, 3, row.size, row.size, device=device)
    target = torch.randint(0, 2, (row.batch, row.size, row.size), device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) / GIB
    del model, optimizer, x, target
    torch.cuda.empty_cache()
    return peak


def calibration_table(rows: List[Row], measure_now: bool) -> List[str]:
    lines = ["| row | size | batch | precision | modelled GiB | measured GiB (before) | measured / modelled |"
             + (" measured GiB (now) |" if measure_now else ""),
             "|---|---:|---:|---|---:|---:|---:|" + ("---:|" if measure_now else "")]
    for row in rows:
        peak = modelled(row).peak_bytes(row.batch) / GIB
        ratios = ", ".join(f"{m / peak:.2f}" for m in row.measured_gib)
        now = f" {measure(row):.2f} |" if measure_now else ""
        lines.append(f"| {row.name} | {row.size} | {row.batch} | {row.precision} | {peak:.2f} | "
                     f"{', '.join(f'{m:g}' for m in row.measured_gib)} | {ratios} |{now}")
    return lines


def planned_batches(targets_gb=(8, 24, 70), size: int = 512) -> List[str]:
    lines = [f"| DPT at {size}x{size}, bf16, AdamW | GB + GB per image | "
             + " | ".join(f"{t:g} GB" for t in targets_gb) + " |",
             "|---|---:|" + "---:|" * len(targets_gb)]
    for backbone_size, decoder in (("small", {}), ("large", {})):
        memory = modelled(Row(f"ViT-{backbone_size}", size, 1, decoder, backbone_size=backbone_size))
        cells = []
        for target in targets_gb:
            cells.append(str(memory.largest_batch(target * 1e9)))
        lines.append(f"| ViT-{backbone_size[0].upper()}/16 DINOv3, seed neck | {memory.fixed_bytes / 1e9:.2f} + "
                     f"{memory.per_image_bytes / 1e9:.3f} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="also measure each row's peak on the GPU (CUDA)")
    args = parser.parse_args(argv)
    if args.measure and not torch.cuda.is_available():
        parser.error("--measure needs a CUDA GPU")
    print("\n".join(calibration_table(MEASURED, args.measure)))
    print()
    print("\n".join(planned_batches()))


if __name__ == "__main__":
    main()
