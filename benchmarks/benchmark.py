"""Speed, memory and FLOPs of the ViT segmentation models next to HF DPT and nnU-Net's 2D U-Net.

One run measures, per model and variant (precision, LoRA, gradient checkpointing, torch.compile,
fused AdamW, channels_last, size and batch): the training step time (forward, cross-entropy,
backward, AdamW step; median over timed steps after warm-up), peak memory, inference throughput,
FLOPs per image of one training step (``torch.utils.flop_counter``) and the achieved share of a
matmul peak measured at start, and how far the variant's inference output is from the plain fp32
model's (same weights and input). It prints one table and writes the rows plus the environment to JSON.

Rows: ``hf_dpt`` (``transformers.DPTForSemanticSegmentation``, DPT-Large config on GPU, a ViT-S sized
DPT on CPU), ``dpt`` (seed defaults, neck ``[E]*4``), ``dpt_light`` (neck ``[E/4, E/2, E, E]``),
``upernet``, ``segformer``, ``primus``, ``primus_ms`` (multi_scale), ``unet`` (nnU-Net's default 2D
``PlainConvUNet`` for the image size). All weights are random (``pretrained=False``); nothing is downloaded.

Only the model layer (``nnunetv2.model``) is imported, never upstream nnU-Net, so this runs on a
bare GPU box with torch, timm, transformers and peft; ``dynamic_network_architectures`` is needed only
for the ``primus*`` and ``unet`` rows (they are skipped with a note without it).

    python benchmarks/benchmark.py --cpu                  # CPU smoke run, ~2 min on 2 cores
    python benchmarks/benchmark.py                        # GPU: 512x512 batch 4, bf16, all models
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
# Random weights only: never wait for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

# name -> (model module, decoder kwargs from the backbone's embedding width E). "<name>_detail" rows add the
# high-resolution detail path; "dpt_demo" is the demo's small DPT (nnunetv2/configs/dpt_demo.yaml's decoder).
VIT_MODELS: Dict[str, Tuple[str, Callable[[int], dict]]] = {
    "dpt": ("model_dpt", lambda e: {}),
    "dpt_light": ("model_dpt", lambda e: {"neck_hidden_sizes": [e // 4, e // 2, e, e]}),
    "dpt_demo": ("model_dpt", lambda e: {"fusion_hidden_size": 64, "neck_hidden_sizes": [e // 8, e // 4, e // 2, e]}),
    "upernet": ("model_upernet", lambda e: {}),
    "segformer": ("model_segformer", lambda e: {}),
    "primus": ("model_primus", lambda e: {}),
    "primus_ms": ("model_primus", lambda e: {"multi_scale": True}),
}
# The detail path at the library's widths; the demo's DPT at the demo config's.
DEMO_DECODER = yaml.safe_load((REPO_ROOT / "nnunetv2" / "configs" / "dpt_demo.yaml").read_text())["model"]["decoder"]
DETAIL_OPTIONS = {"dpt_demo": {"detail_channels": DEMO_DECODER["detail_channels"]}}
VIT_MODELS.update({f"{name}_detail": (module, lambda e, kwargs=kwargs, name=name: {
    **kwargs(e), "detail_path": True, **DETAIL_OPTIONS.get(name, {})})
    for name, (module, kwargs) in list(VIT_MODELS.items()) if name not in ("dpt_light", "primus_ms")})
MODELS = ("hf_dpt", *VIT_MODELS, "unet")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
LORA_RANK = 8

# HF DPT configs. "large" is Intel/dpt-large (ViT-L/16); "small" a ViT-S/16 sized DPT for CPU runs so
# the comparison with a ViT-S backbone is like for like; "tiny" only for tests.
HF_DPT_CONFIGS: Dict[str, dict] = {
    "large": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        neck_hidden_sizes=[256, 512, 1024, 1024], backbone_out_indices=[5, 11, 17, 23], fusion_hidden_size=256,
    ),
    "small": dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
        # [E/4, E/2, E, E] as DPT-Large's [256, 512, 1024, 1024] and our dpt_light row: the same neck widths.
        neck_hidden_sizes=[96, 192, 384, 384], backbone_out_indices=[2, 5, 8, 11], fusion_hidden_size=256,
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
        neck_hidden_sizes=[16, 32, 64, 64], backbone_out_indices=[0, 1, 2, 3], fusion_hidden_size=32,
    ),
}
# Shared by all HF configs; BN in the fusion residual and no auxiliary head match our DPT rows.
HF_DPT_COMMON = dict(
    patch_size=16, readout_type="project", use_batch_norm_in_fusion_residual=True, use_auxiliary_head=False,
)


class SkipRow(Exception):
    """A row that cannot run here for a known reason (missing optional package)."""


@dataclass(frozen=True)
class Variant:
    """One benchmark row's set-up."""

    model: str
    size: int
    batch: int
    precision: str
    lora: bool = False
    grad_ckpt: bool = False
    compile: str = "off"  # off, on (the whole model) or regional (each block and decoder part, our models only)
    fused: bool = False
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def label(self, fused_default: bool) -> str:
        """Short description, e.g. ``bf16+lora+ckpt+compile``; fused AdamW shown only when not the device default."""
        parts = [self.precision]
        compiled = {"off": None, "on": "compile", "regional": "regional"}[self.compile]
        parts += [name for name, on in (("lora", self.lora), ("ckpt", self.grad_ckpt), (compiled, compiled),
                                        ("cl", self.channels_last)) if on]
        if self.fused != fused_default:
            parts.append("fused" if self.fused else "unfused")
        return "+".join(parts)


@dataclass
class Row:
    """One measured (or failed/skipped) row of the table."""

    variant: Variant
    label: str
    train_ms: Optional[float] = None
    train_img_s: Optional[float] = None
    ratio_vs_hf_dpt: Optional[float] = None
    peak_gib: Optional[float] = None
    infer_img_s: Optional[float] = None
    tflop_per_img: Optional[float] = None
    pct_of_peak: Optional[float] = None
    compile_s: Optional[float] = None
    rel_err_vs_fp32: Optional[float] = None
    params_total: Optional[int] = None
    params_trainable: Optional[int] = None
    train_step_ms_all: List[float] = field(default_factory=list)
    note: str = ""

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(out.pop("variant"))
        return out


# ----------------------------------------------------------------------------------------------
# models


class HFDPTLogits(nn.Module):
    """``DPTForSemanticSegmentation`` behind the same interface as our models: image -> logits."""

    def __init__(self, config) -> None:
        super().__init__()
        from transformers import DPTForSemanticSegmentation

        self.model = DPTForSemanticSegmentation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            self.model.gradient_checkpointing_enable()
        else:
            self.model.gradient_checkpointing_disable()


def hf_dpt_config(name: str, size: int, num_classes: int):
    """A ``DPTConfig`` from ``HF_DPT_CONFIGS`` for square images of ``size``."""
    from transformers import DPTConfig

    return DPTConfig(**HF_DPT_CONFIGS[name], **HF_DPT_COMMON, image_size=size, num_labels=num_classes)


def unet_plan(size: int) -> Tuple[int, List[int], List[int]]:
    """nnU-Net 2D defaults for a square patch: pool until the bottleneck is 4x4, features 32 doubling to 512.

    Returns ``(n_stages, features_per_stage, strides)``; e.g. 512 -> 8 stages, 4x4 bottleneck.
    """
    n_pool = max(0, int(math.floor(math.log2(size / 4))))
    while n_pool and size % 2**n_pool:
        n_pool -= 1
    n_stages = n_pool + 1
    return n_stages, [min(32 * 2**i, 512) for i in range(n_stages)], [1] + [2] * n_pool


def build_unet(size: int, num_classes: int) -> nn.Module:
    """nnU-Net's default 2D ``PlainConvUNet`` (InstanceNorm, LeakyReLU, 2 convs per stage, no deep supervision)."""
    try:
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ModuleNotFoundError as err:
        raise SkipRow("skipped: dynamic_network_architectures not installed") from err
    n_stages, features, strides = unet_plan(size)
    return PlainConvUNet(
        input_channels=3, n_stages=n_stages, features_per_stage=features, conv_op=nn.Conv2d, kernel_sizes=3,
        strides=strides, n_conv_per_stage=2, num_classes=num_classes, n_conv_per_stage_decoder=2, conv_bias=True,
        norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=False,
    )


def backbone_embed_dim(backbone: str, size: str) -> int:
    """Embedding width E of a registry backbone, read from a timm model built on the meta device."""
    import timm

    from nnunetv2.model.backbone import get_family

    with torch.device("meta"):
        return timm.create_model(get_family(backbone, size).timm_name.format(size=size), pretrained=False).embed_dim


def build_model(v: Variant, args: argparse.Namespace) -> nn.Module:
    """The model of one row, random init, on the current default device."""
    if v.model == "hf_dpt":
        return HFDPTLogits(hf_dpt_config(args.hf_config, v.size, args.num_classes))
    if v.model == "unet":
        return build_unet(v.size, args.num_classes)
    module_name, decoder_kwargs = VIT_MODELS[v.model]
    try:
        module = importlib.import_module(f"nnunetv2.model.{module_name}")
    except ModuleNotFoundError as err:
        raise SkipRow(f"skipped: {err.name} not installed") from err
    return module.create_segmentation_model(
        args.backbone, args.size, args.num_classes, pretrained=False, use_lora=v.lora, lora_rank=LORA_RANK,
        **decoder_kwargs(backbone_embed_dim(args.backbone, args.size)),
    )


def supports(model: str) -> Dict[str, bool]:
    """Which variant switches apply to a model (others collapse to off)."""
    ours = model not in ("hf_dpt", "unet")
    return {"lora": ours, "grad_ckpt": model != "unet", "regional": ours}


# ----------------------------------------------------------------------------------------------
# measurement helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], None], n: int, device: torch.device) -> List[float]:
    """Seconds per call of ``fn``, each ended by a device synchronize."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure_matmul_peak(device: torch.device, n: int) -> Tuple[float, str]:
    """Best achieved FLOP/s of an ``n``^3 matmul: bf16 on GPU, fp32 on CPU. Returns ``(flop_per_s, label)``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 1

    def burst() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    burst()
    best = min(time_calls(burst, 3, device))
    label = f"{'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul {n}^3"
    return 2 * n**3 * reps / best, label


def rss_bytes() -> Optional[int]:
    """Current resident set size (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RssPeak:
    """Largest resident-set growth over the start value while active, sampled by a thread (CPU runs)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.base = rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_bytes() or 0)

    def __enter__(self) -> "RssPeak":
        if self.base is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    @property
    def growth_bytes(self) -> Optional[int]:
        return None if self.base is None else max(0, (self.peak or 0) - self.base)


def release_memory(device: torch.device, compiled: bool = False) -> None:
    """Free what the previous row left: Python garbage, compiled graphs, CUDA cache, malloc arenas."""
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def ieee_fp32_convolutions() -> Iterator[None]:
    """cuDNN convolutions in full fp32 (PyTorch allows TF32 for them by default); no effect on CPU."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||`` in fp32."""
    output, reference = output.float(), reference.float()
    return ((output - reference).norm() / reference.norm()).item()


def short_error(err: BaseException, limit: int = 80) -> str:
    """One-line error text for the table."""
    if isinstance(err, torch.OutOfMemoryError):
        return "OOM"
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# one row


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the row's precision (nothing for fp32)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def measure_training(model: nn.Module, net: nn.Module, v: Variant, args: argparse.Namespace, device: torch.device,
                     row: Row) -> Tuple[List[float], float]:
    """Time training steps of ``net`` (``model``, maybe compiled); returns ``(step seconds, FLOPs per image)``.

    Optimizer state, scaler and batch die with this frame, so inference afterwards runs without them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=v.fused)
    scaler = torch.amp.GradScaler(device.type) if v.precision == "fp16" else None
    x = torch.randn(v.batch, 3, v.size, v.size, device=device).contiguous(memory_format=v.memory_format)
    y = torch.randint(0, args.num_classes, (v.batch, v.size, v.size), device=device)

    def train_step(step_net: nn.Module) -> None:
        optimizer.zero_grad(set_to_none=True)  # first, as nnU-Net does: no stale grads during forward
        with autocast(device, v.precision):
            logits = step_net(x)
            if logits.shape[-2:] != y.shape[-2:]:
                logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    # FLOPs of one eager step (compile does not change them); doubles as a first warm-up step.
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        train_step(model)
    synchronize(device)
    if v.compile != "off":
        row.compile_s = time_calls(lambda: train_step(net), 1, device)[0]
    time_calls(lambda: train_step(net), args.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # after compile and the eager FLOP step
    times = time_calls(lambda: train_step(net), args.steps, device)
    if device.type == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    optimizer.zero_grad(set_to_none=True)
    return times, counter.get_total_flops() / v.batch


def measure_inference(model: nn.Module, net: nn.Module, v: Variant, args: argparse.Namespace, device: torch.device,
                      row: Row) -> None:
    """Inference images/s of ``net`` (eval, no autograd, ``--infer-batch``) and its distance from fp32 ``model``."""
    model.eval()
    x = torch.randn(args.infer_batch, 3, v.size, v.size, device=device).contiguous(memory_format=v.memory_format)

    def infer_step() -> torch.Tensor:
        with torch.no_grad(), autocast(device, v.precision):
            return net(x)

    time_calls(infer_step, max(args.warmup, 1 if v.compile != "off" else 0), device)
    row.infer_img_s = args.infer_batch / statistics.median(time_calls(infer_step, args.steps, device))
    # Exactness: the variant (precision, compile, channels_last) against the plain fp32 eager model.
    with torch.no_grad(), ieee_fp32_convolutions():
        reference = model(x)
    row.rel_err_vs_fp32 = relative_error(infer_step(), reference)


def run_row(v: Variant, args: argparse.Namespace, device: torch.device, peak_flops: float, row: Row) -> None:
    """Build the row's model, measure it, fill ``row``; everything it allocates dies with this frame."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss = RssPeak() if device.type == "cpu" else contextlib.nullcontext()
    with rss:
        with device:
            model = build_model(v, args)
        model = model.to(device=device, memory_format=v.memory_format).train()
        if v.grad_ckpt:
            model.set_grad_checkpointing(True)
        row.params_total = sum(p.numel() for p in model.parameters())
        row.params_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        net = torch.compile(model) if v.compile == "on" else model
        if v.compile == "regional":
            model.compile_regions()
        times, flops_per_img = measure_training(model, net, v, args, device, row)

    if device.type == "cpu" and rss.growth_bytes is not None:
        row.peak_gib = rss.growth_bytes / 2**30
    row.train_step_ms_all = [t * 1e3 for t in times]
    step_s = statistics.median(times)
    row.train_ms = step_s * 1e3
    row.train_img_s = v.batch / step_s
    row.tflop_per_img = flops_per_img / 1e12
    row.pct_of_peak = 100 * flops_per_img * row.train_img_s / peak_flops
    if not args.skip_infer:
        measure_inference(model, net, v, args, device, row)


# ----------------------------------------------------------------------------------------------
# run plan, table, JSON


def parse_size(text: str) -> Tuple[int, int]:
    """``512:4`` -> ``(512, 4)``."""
    try:
        size, batch = (int(part) for part in text.split(":"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected SIZE:BATCH like 512:4, got '{text}'") from err
    if size < 16 or batch < 1:
        raise argparse.ArgumentTypeError(f"size must be >= 16 and batch >= 1, got '{text}'")
    return size, batch


def on_off(values: Sequence[str]) -> List[bool]:
    return [value == "on" for value in dict.fromkeys(values)]


def plan_variants(args: argparse.Namespace) -> List[Variant]:
    """All requested rows in order (size, precision, model, switches); switches a model lacks collapse to off."""
    variants: Dict[Variant, None] = {}
    for size, batch in args.sizes:
        for precision in dict.fromkeys(args.precision):
            for model in dict.fromkeys(args.models):
                ok = supports(model)
                for lora in on_off(args.lora):
                    for ckpt in on_off(args.grad_ckpt):
                        for comp in dict.fromkeys(args.compile):
                            for fused in on_off(args.fused):
                                variants[Variant(
                                    model, size, batch, precision, lora=lora and ok["lora"],
                                    grad_ckpt=ckpt and ok["grad_ckpt"],
                                    compile="on" if comp == "regional" and not ok["regional"] else comp, fused=fused,
                                    channels_last=args.channels_last,
                                )] = None
    return list(variants)


def fill_ratios(rows: List[Row]) -> None:
    """Train img/s over the HF DPT row of the same size and precision (closest switches preferred)."""
    hf_rows = [r for r in rows if r.variant.model == "hf_dpt" and r.train_img_s]
    for row in rows:
        if not row.train_img_s:
            continue
        v = row.variant
        same = [r for r in hf_rows if (r.variant.size, r.variant.precision) == (v.size, v.precision)]
        if not same:
            continue
        best = max(same, key=lambda r: sum(getattr(r.variant, k) == getattr(v, k)
                                         for k in ("compile", "grad_ckpt", "fused", "channels_last", "batch")))
        row.ratio_vs_hf_dpt = row.train_img_s / best.train_img_s


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


TABLE_COLUMNS = ("model", "variant", "size", "batch", "train ms/step", "train img/s", "vs HF DPT", "peak GiB",
                 "infer img/s", "rel err", "TFLOP/img", "% of peak", "compile s", "note")


def format_table(rows: List[Row]) -> str:
    """Markdown table with fixed columns."""
    body = [
        (r.variant.model, r.label, str(r.variant.size), str(r.variant.batch), fmt(r.train_ms, ".1f"),
         fmt(r.train_img_s, ".2f"), fmt(r.ratio_vs_hf_dpt, ".2f"), fmt(r.peak_gib, ".2f"), fmt(r.infer_img_s, ".2f"),
         fmt(r.rel_err_vs_fp32, ".1e"), fmt(r.tflop_per_img, ".4g"), fmt(r.pct_of_peak, ".1f"), fmt(r.compile_s, ".1f"),
         r.note)
        for r in rows
    ]
    widths = [max(len(c), *(len(line[i]) for line in body)) if body else len(c) for i, c in enumerate(TABLE_COLUMNS)]
    numeric = set(range(2, 13))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + (":" if i in numeric else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(TABLE_COLUMNS), sep] + [line(cells) for cells in body])


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    return None


def environment(device: torch.device, argv: Sequence[str], peak: Tuple[float, str], args: argparse.Namespace) -> dict:
    """What the numbers depend on: device, library versions, command line, measured matmul peak."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "cpu_threads_reason": args.threads_reason,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "versions": {pkg: package_version(pkg) for pkg in
                     ("torch", "timm", "transformers", "peft", "dynamic_network_architectures")},
        "cuda": torch.version.cuda,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": git_commit(),
        "command": " ".join([Path(sys.argv[0]).name if sys.argv else "benchmark.py", *argv]),
        "matmul_peak_tflop_s": peak[0] / 1e12,
        "matmul_peak_kind": peak[1],
        "backbone": f"{args.backbone}/{args.size}",
        "hf_dpt_config": args.hf_config,
        "num_classes": args.num_classes,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "infer_batch": args.infer_batch,
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_json(path: Path, env: dict, rows: List[Row]) -> None:
    """Write atomically (a killed run leaves the previous complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"environment": env, "rows": [r.to_json() for r in rows]}, indent=2))
    tmp.replace(path)


def header_lines(env: dict, args: argparse.Namespace) -> List[str]:
    hf = HF_DPT_CONFIGS[args.hf_config]
    hf_desc = {"large": "DPT-Large (ViT-L/16)", "small": "a ViT-S/16 sized DPT", "tiny": "a tiny test DPT"}
    hf_desc = hf_desc[args.hf_config]
    lines = [
        f"Device: {env['device']} ({env['device_type']}, {env['cpu_threads']} CPU threads: "
        f"{env['cpu_threads_reason']}) | torch "
        f"{env['versions']['torch']}, timm {env['versions']['timm']}, transformers {env['versions']['transformers']}",
        f"Matmul peak: {env['matmul_peak_tflop_s']:.3g} TFLOP/s ({env['matmul_peak_kind']}); '% of peak' = "
        f"TFLOP/img x train img/s over it",
        f"Backbone: {args.backbone}/{args.size}, random init; {args.num_classes} classes; "
        f"{args.warmup} warm-up + {args.steps} timed steps (median); inference batch {args.infer_batch}",
        f"HF DPT baseline: {hf_desc}: hidden {hf['hidden_size']}, {hf['num_hidden_layers']} layers, neck "
        f"{hf['neck_hidden_sizes']}, fusion {hf['fusion_hidden_size']}, BN in fusion residual, no auxiliary head",
    ]
    if args.hf_config == "small":
        lines.append("  (on CPU the HF baseline is a ViT-S-sized DPT, so the comparison with the ViT-S backbone is "
                     "like for like)")
    peak = ("torch.cuda.max_memory_allocated over the timed training steps" if env["device_type"] == "cuda"
            else "resident-set growth during the row's training (sampled; approximate)")
    lines.append(f"Peak GiB: {peak}")
    lines.append("Rel err: ||inference output - fp32 eager output|| / ||fp32 eager output||, same weights and input "
                 "(reference without TF32); the speed issue's bound is 1e-2")
    return lines


def default_cpu_threads() -> Tuple[int, str]:
    """2 threads, but 1 when the 1-minute load average shows other work on the cores; returns ``(n, why)``.

    On 2 shared cores with other processes running, 2 intra-op threads stall at barriers: a CPU run
    here took 440 s with erratic steps (0.5-19 s for the same step) against 97 s with 1 thread.
    """
    with contextlib.suppress(OSError, AttributeError):
        load = os.getloadavg()[0]
        if load >= 1.0:
            return 1, f"load average {load:.2f} >= 1: other work on the cores, 2 threads would stall"
    return 2, "default"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run on CPU (default when CUDA is missing)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="rows to measure")
    parser.add_argument("--backbone", default="dinov3", help="backbone family of the ViT rows")
    parser.add_argument("--size", default=None, help="backbone size (default large on GPU, small on CPU)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None,
                        help="SIZE:BATCH pairs (default 512:4 on GPU, 224:2 on CPU)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None,
                        help="fp16 = autocast + GradScaler (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--lora", nargs="+", choices=("off", "on"), default=["off"],
                        help=f"LoRA rank {LORA_RANK} on the backbone (not for hf_dpt/unet)")
    parser.add_argument("--grad-ckpt", nargs="+", choices=("off", "on"), default=["off"],
                        help="gradient checkpointing (not for unet)")
    parser.add_argument("--compile", nargs="+", choices=("off", "on", "regional"), default=["off"],
                        help="torch.compile the whole model (on), or each transformer block and decoder part (regional;"
                             " HF DPT and U-Net rows compile whole)")
    parser.add_argument("--fused", nargs="+", choices=("off", "on"), default=None,
                        help="fused AdamW (default on for CUDA, off on CPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    parser.add_argument("--hf-config", choices=tuple(HF_DPT_CONFIGS), default=None,
                        help="HF DPT baseline size (default large on GPU, small on CPU)")
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3 GPU, 1 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 3 CPU)")
    parser.add_argument("--infer-batch", type=int, default=None, help="inference batch size (default 16 GPU, 2 CPU)")
    parser.add_argument("--skip-infer", action="store_true",
                        help="no inference measurement (saves a second compile in --compile on rows)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n^3 peak matmul (default 8192 GPU, 2048 CPU)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (CPU mode default: 2, or 1 while other work keeps the cores busy)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; rows not started by then are listed as skipped")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/<timestamp>.json)")
    args = parser.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.cpu
    args.cpu = not gpu
    defaults = dict(size="large", sizes=[(512, 4)], precision=["bf16"], fused=["on"], hf_config="large", warmup=3,
                    steps=10, infer_batch=16, matmul_size=8192)
    if not gpu:
        defaults.update(size="small", sizes=[(224, 2)], precision=["fp32"], fused=["off"], hf_config="small",
                        warmup=1, steps=3, infer_batch=2, matmul_size=2048)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.infer_batch < 1:
        parser.error("--steps and --infer-batch must be >= 1, --warmup >= 0")
    if args.out is None:
        args.out = REPO_ROOT / "benchmarks" / "results" / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark, print the table, write the JSON; returns what was written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.threads_reason = "--threads" if args.threads else "torch default"
    if args.cpu and args.threads is None:
        args.threads, args.threads_reason = default_cpu_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer sets it

    start = time.perf_counter()
    peak = measure_matmul_peak(device, args.matmul_size)
    env = environment(device, argv, peak, args)
    fused_default = device.type == "cuda"
    variants = plan_variants(args)
    rows: List[Row] = []
    for i, v in enumerate(variants, 1):
        row = Row(v, v.label(fused_default))
        if v.model == "unet":
            row.note = f"{unet_plan(v.size)[0]} stages"
        if args.time_budget is not None and time.perf_counter() - start > args.time_budget:
            row.note = "skipped: time budget"
        else:
            try:
                run_row(v, args, device, peak[0], row)
            except SkipRow as err:
                row.note = str(err)
            except Exception as err:  # one failing row (OOM, unsupported combination) must not end the run
                row.note = short_error(err)
            release_memory(device, compiled=v.compile != "off")
        rows.append(row)
        fill_ratios(rows)
        write_json(args.out, env, rows)
        status = f"{row.train_img_s:.2f} img/s" if row.train_img_s else row.note
        print(f"[{i}/{len(variants)}] {v.model} {row.label} {v.size}x{v.batch}: {status}", file=sys.stderr, flush=True)

    env["total_s"] = time.perf_counter() - start
    write_json(args.out, env, rows)
    print("\n".join(header_lines(env, args)))
    print()
    print(format_table(rows))
    print(f"\nJSON: {args.out} ({env['total_s']:.0f} s)")
    return json.loads(args.out.read_text())


if __name__ == "__main__":
    main()
