#!/usr/bin/env python
"""DINO pretraining step throughput: VisionFM's step against the textbook DINO step, in one process.

*ours* is the library's own step, :meth:`visionfm.engine.dino_trainer.DINOTrainer.train_step_views` on a
trainer built from ``configs/pretrain/default.yaml`` (the code ``pretrain/dino.py`` runs, with its precision,
attention, head, optimiser and EMA).

*reference* is written below the way the DINO paper's code (facebookresearch/dino, ``main_dino.py`` and
``vision_transformer.py``) does it: a ViT with hand-written attention ``softmax(q k^T / sqrt(d)) v``, fp32 on the
CPU (fp16 autocast + grad scaler on a GPU), one backbone call per crop resolution and a separate head call per crop
group, a weight-normalised last layer, the loss as a loop over teacher/student crop pairs, ``torch.optim.AdamW``
with its defaults and a per-tensor EMA loop. Both steps do the same mathematics: identical architecture, weights
(copied from ours), crops, batch, schedules (lr, weight decay, momentum, temperatures) and gradient clipping
(global norm).

A full step is: student forward on all crops, teacher forward on the global crops, loss, backward, gradient
clipping, optimiser step, EMA update of the teacher. Crops are made once (with the library's multi-crop
augmentation) and fed to both, so data loading is not part of the step (``--data-wait`` measures it).

Both run in one process, alternating, after two warm-up steps each. The first warm-up step runs both from the same
weights on the same crops with drop-path off and prints both losses and gradient norms (they must agree to within
bf16 rounding; the script fails otherwise); the second measures peak memory. Reported: median images/s, the ratio
ours/reference, peak memory of a step (parameters, optimiser state, gradients, activations and any caches), and
model-FLOP utilisation (MFU) against a matmul ceiling measured on the spot, interleaved with the steps, in the
step's precision (bf16 for ours where the hardware has it, fp32 for the reference on a CPU).

Examples:
    python benchmarks/pretrain_step.py --arch vit_tiny --batch-size 16 --repeats 3 --json tiny.json
    python benchmarks/pretrain_step.py --arch vit_tiny vit_small --batch-size 16 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from visionfm.config import build_config  # noqa: E402
from visionfm.data.augment import MultiCropAugmentation  # noqa: E402
from visionfm.engine.dino_trainer import DINOTrainer  # noqa: E402
from visionfm.engine.threads import fastest_cpu_threads  # noqa: E402
from visionfm.engine.precision import resolve_precision  # noqa: E402
from visionfm.models.vit import ARCHS  # noqa: E402

STEPS_PER_EPOCH = 100
EPOCH = 2  # past the last-layer freeze, so every parameter is updated
FIRST_STEP = EPOCH * STEPS_PER_EPOCH + 1


# ============================================================================================ the reference
class RefDropPath(nn.Module):
    """Stochastic depth as in DINO's ``utils.drop_path``."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x.div(keep) * mask.floor_()


class RefAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class RefMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.drop_path = RefDropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    """DINO's ``VisionTransformer`` (CLS output). Parameter names follow timm's so weights copy one to one."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                 drop_path_rate: float) -> None:
        super().__init__()
        self.patch, self.grid = patch_size, img_size // patch_size
        self.patch_embed = RefPatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([RefBlock(embed_dim, num_heads, r) for r in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, h: int, w: int) -> Tensor:
        if h == self.grid and w == self.grid:
            return self.pos_embed
        # Bicubic with antialiasing, as timm resamples it, so that both models see the same position embedding.
        cls, patch = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        dim = patch.shape[-1]
        patch = F.interpolate(patch.reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2), size=(h, w),
                              mode="bicubic", antialias=True)
        return torch.cat([cls, patch.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(h // self.patch, w // self.patch)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


class RefHead(nn.Module):
    """DINO's ``DINOHead``: 3-layer MLP, l2 normalisation, weight-normalised last layer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, norm_last_layer: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                    nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # DINO's code uses the classic weight_norm
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class RefMultiCrop(nn.Module):
    """One backbone call per crop resolution, and a head call per crop group."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        counts = torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1]
        start, outputs = 0, []
        for end in torch.cumsum(counts, 0).tolist():
            outputs.append(self.head(self.backbone(torch.cat(list(x[start:end])))))
            start = end
        return torch.cat(outputs)


class RefDINOLoss(nn.Module):
    """DINO's ``DINOLoss``: cross-entropy summed over every (teacher crop, other student crop) pair."""

    def __init__(self, out_dim: int, ncrops: int, student_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: Tensor, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                terms += 1
        self.update_center(teacher_output)
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class ReferenceDINO:
    """The textbook DINO training step (see the module docstring)."""

    def __init__(self, arch: str, patch_size: int, img_size: int, drop_path_rate: float, head: Dict[str, Any],
                 ncrops: int, dino: Dict[str, Any], clip_grad: float, device: torch.device) -> None:
        dims = ARCHS[arch.split("_patch")[0]]
        def network() -> RefMultiCrop:
            backbone = RefViT(dims["embed_dim"], dims["depth"], dims["num_heads"], patch_size, img_size, drop_path_rate)
            return RefMultiCrop(backbone, RefHead(dims["embed_dim"], head["out_dim"], head["hidden_dim"],
                                                  head["bottleneck_dim"], head["norm_last_layer"]))
        self.student, self.teacher = network().to(device), network().to(device)
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = RefDINOLoss(head["out_dim"], ncrops, dino["student_temp"], dino["center_momentum"]).to(device)
        regularized, not_regularized = [], []
        for name, p in self.student.named_parameters():
            if not p.requires_grad:
                continue
            (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
        self.optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
        self.scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
        self.device, self.clip_grad = device, clip_grad

    def load_from(self, student_state: Dict[str, Tensor], teacher_state: Dict[str, Tensor]) -> None:
        """Copy weights (ours → reference) by name, strictly: the architectures are the same."""
        self.student.load_state_dict(student_state, strict=True)
        self.teacher.load_state_dict(teacher_state, strict=True)

    def modules(self) -> List[nn.Module]:
        return [self.student, self.teacher, self.loss]

    def step(self, global_views: List[Tensor], local_views: List[Tensor], lr: float, wd: float, momentum: float,
             teacher_temp: float) -> Dict[str, float]:
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        amp = torch.autocast("cuda", dtype=torch.float16) if self.scaler is not None else contextlib.nullcontext()
        with amp:
            teacher_output = self.teacher(global_views)
            student_output = self.student(global_views + local_views)
            loss = self.loss(student_output, teacher_output, teacher_temp)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"reference loss is {loss.item()}")
        self.optimizer.zero_grad()
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        params = [p for p in self.student.parameters() if p.grad is not None]
        total_norm = torch.norm(torch.stack([p.grad.detach().norm(2) for p in params]), 2)
        clip_coef = self.clip_grad / (total_norm + 1e-6)
        if clip_coef < 1:
            for p in params:
                p.grad.detach().mul_(clip_coef)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        return {"loss": loss.item(), "grad_norm": total_norm.item()}


# ============================================================================================ ours
def build_ours(args: argparse.Namespace, arch: str, batch: int, device: torch.device) -> DINOTrainer:
    """A DINO trainer from the default pretraining config, with the model built (no data needed)."""
    flags = {"model.arch": arch, "optim.batch_size": batch, "head.out_dim": args.out_dim,
             "crops.global_size": args.global_size, "crops.local_size": args.local_size,
             "crops.local_number": args.local_crops, "train.device": str(device), "train.precision": args.precision,
             "optim.epochs": EPOCH + 10, "train.seed": args.seed}
    cfg = build_config(ROOT / "configs" / "pretrain" / "default.yaml", None, flags, args.set)
    trainer = DINOTrainer(cfg, tempfile.mkdtemp(prefix="vfm_bench_"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer._build_model(steps_per_epoch=STEPS_PER_EPOCH)
    trainer.model.train()
    trainer.model.teacher.eval()
    return trainer


# ============================================================================================ measuring
def vit_forward_flops(dim: int, depth: int, patch: int, size: int, mlp_ratio: int = 4) -> float:
    """Matmul FLOPs (2 per multiply-add) of one image through the ViT encoder for its CLS output.

    Only work the CLS output depends on is counted, for both implementations: in the last block, keys and values of
    every token but the query, attention output, projection and MLP of the CLS token alone (the reference computes
    them for every token and throws them away). Stochastic depth is not discounted."""
    n_patches = (size // patch) ** 2
    n = n_patches + 1
    embed = 2 * n_patches * 3 * patch * patch * dim
    block = 2 * n * dim * 3 * dim + 2 * 2 * n * n * dim + 2 * n * dim * dim + 2 * 2 * n * dim * mlp_ratio * dim
    last = 2 * n * dim * 2 * dim + 2 * dim * dim + 2 * 2 * n * dim + 2 * dim * dim + 2 * 2 * dim * mlp_ratio * dim
    return float(embed + (depth - 1) * block + last)


def step_flops(arch: str, patch: int, head: Dict[str, Any], batch: int, global_size: int, local_size: int,
               n_local: int) -> float:
    """Model FLOPs of one DINO step: 3x forward (forward + backward) for the student on all crops, 1x forward for
    the teacher on the two global crops."""
    d = ARCHS[arch.split("_patch")[0]]
    head_f = 2.0 * (d["embed_dim"] * head["hidden_dim"] + head["hidden_dim"] ** 2
                    + head["hidden_dim"] * head["bottleneck_dim"] + head["bottleneck_dim"] * head["out_dim"])
    g = vit_forward_flops(d["embed_dim"], d["depth"], patch, global_size) + head_f
    loc = vit_forward_flops(d["embed_dim"], d["depth"], patch, local_size) + head_f
    return batch * (3 * (2 * g + n_local * loc) + 2 * g)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(dtype: torch.dtype, device: torch.device, n: int, reps: int = 3) -> Tuple[float, float]:
    """Best FLOP/s of an ``n x n`` matmul in ``dtype`` over a few runs (the machine's current ceiling), by wall
    time and by the process's CPU time (the latter unaffected by waiting for a core on a busy machine)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.mm(a, b)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync(device)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return 2.0 * n ** 3 / best, 2.0 * n ** 3 / max(best_cpu, 1e-9)


def tensor_bytes(modules: Sequence[nn.Module]) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def peak_memory(device: torch.device, first: Callable[[], Any], second: Callable[[], Any],
                resident: Sequence[nn.Module]) -> int:
    """Peak bytes in use during ``second()`` (run right after ``first()``).

    On a GPU: the allocator's peak. On the CPU: the torch profiler's allocation events over both calls give the
    net bytes allocated since ``first()`` began (optimiser state, gradients, activations, caches); the peak of that
    during ``second()`` plus the parameters and buffers of ``resident`` (allocated before) is the step's peak.
    """
    if device.type == "cuda":
        first()
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        second()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile, record_function

    base = tensor_bytes(resident)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        first()
        with record_function("measured_step"):
            second()
    events = prof.profiler.kineto_results.events()
    window = [(e.start_ns(), e.end_ns()) for e in events if e.name() == "measured_step"][0]
    live, peak = 0, 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()
        if window[0] <= e.start_ns() <= window[1]:
            peak = max(peak, live)
    return base + peak


@contextlib.contextmanager
def drop_path_off(modules: Sequence[nn.Module]):
    """Turn stochastic depth off (both implementations draw their masks differently)."""
    saved = []
    for m in modules:
        for mod in m.modules():
            if hasattr(mod, "drop_prob"):
                saved.append((mod, mod.drop_prob))
                mod.drop_prob = 0.0
    try:
        yield
    finally:
        for mod, p in saved:
            mod.drop_prob = p


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_case(args: argparse.Namespace, arch: str, batch: int, device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    trainer = build_ours(args, arch, batch, device)
    cfg = trainer.cfg
    ours_dtype = trainer.amp_dtype
    ref = ReferenceDINO(arch, cfg["model"]["patch_size"], args.global_size, cfg["model"]["drop_path_rate"],
                        cfg["head"], 2 + args.local_crops, cfg["dino"], cfg["optim"]["clip_grad"], device)
    ref.load_from(trainer.model.student.state_dict(), trainer.model.teacher.state_dict())

    augment = MultiCropAugmentation(cfg["modality"], args.global_size, args.local_size, args.local_crops).to(device)
    images = torch.randint(0, 256, (batch, 3, int(args.global_size * 1.15), int(args.global_size * 1.15)),
                           dtype=torch.uint8, device=device)
    global_views, local_views = augment(images)
    s = trainer.schedules

    def ours(step: int) -> Dict[str, float]:
        return trainer.train_step_views(global_views, local_views, step, EPOCH)

    def reference(step: int) -> Dict[str, float]:
        return ref.step(global_views, local_views, float(s.lr[step]), float(s.weight_decay[step]),
                        float(s.momentum[step]), float(s.teacher_temp[step]))

    # Warm-up 1 (same weights, same crops, no drop-path): the losses must agree. Warm-up 2: peak memory.
    check: Dict[str, Dict[str, float]] = {}
    peaks: Dict[str, int] = {}
    for name, fn, resident in (("ours", ours, [trainer.model, trainer.loss_fn]), ("reference", reference, ref.modules())):
        def first(fn=fn, name=name, resident=resident):
            with drop_path_off(resident):
                # floats (ours keeps a step's values on the device unless the step is a logging step)
                check[name] = {k: float(v) for k, v in fn(FIRST_STEP).items()}
        peaks[name] = peak_memory(device, first, lambda fn=fn: fn(FIRST_STEP + 1), resident)
    loss_rel = abs(check["ours"]["loss"] - check["reference"]["loss"]) / abs(check["reference"]["loss"])
    grad_rel = abs(check["ours"]["grad_norm"] - check["reference"]["grad_norm"]) / check["reference"]["grad_norm"]

    times: Dict[str, List[float]] = {"ours": [], "reference": []}
    cpu_times: Dict[str, List[float]] = {"ours": [], "reference": []}
    ceilings: Dict[str, List[float]] = {"bf16": [], "fp32": []}
    cpu_ceilings: Dict[str, List[float]] = {"bf16": [], "fp32": []}
    fns = {"ours": ours, "reference": reference}
    step = FIRST_STEP + 2
    n = 2048 if device.type == "cpu" else 8192
    for r in range(args.repeats):
        for name in (("ours", "reference") if r % 2 == 0 else ("reference", "ours")):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name](step)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
        step += 1
        for key, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            wall, cpu = matmul_ceiling(dtype, device, n)
            ceilings[key].append(wall)
            cpu_ceilings[key].append(cpu)

    flops = step_flops(arch, cfg["model"]["patch_size"], cfg["head"], batch, args.global_size, args.local_size,
                       args.local_crops)
    med = {k: statistics.median(v) for k, v in times.items()}
    ceil = {k: statistics.median(v) for k, v in ceilings.items()}
    cpu_ceil = {k: statistics.median(v) for k, v in cpu_ceilings.items()}
    ours_key = "bf16" if ours_dtype in (torch.bfloat16, torch.float16) else "fp32"
    ref_key = "fp32" if device.type == "cpu" else "bf16"
    ours_ceiling, ref_ceiling = ceil[ours_key], ceil[ref_key]
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    return {
        "arch": arch, "batch_size": batch, "device": str(device),
        "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}", "out_dim": args.out_dim,
        "ours_precision": str(ours_dtype or "fp32").replace("torch.", ""),
        "ours_images_per_s": batch / med["ours"], "reference_images_per_s": batch / med["reference"],
        "ratio": med["reference"] / med["ours"],
        "mfu": flops / med["ours"] / ours_ceiling, "reference_mfu": flops / med["reference"] / ref_ceiling,
        # the same from CPU time (step and ceiling), which waiting for a core on a shared machine does not inflate
        "mfu_cpu_time": flops / cpu_med["ours"] / cpu_ceil[ours_key],
        "reference_mfu_cpu_time": flops / cpu_med["reference"] / cpu_ceil[ref_key],
        "ceiling_bf16_gflops_cpu_time": cpu_ceil["bf16"] / 1e9, "ceiling_fp32_gflops_cpu_time": cpu_ceil["fp32"] / 1e9,
        "step_gflop": flops / 1e9, "ceiling_bf16_gflops": ceil["bf16"] / 1e9, "ceiling_fp32_gflops": ceil["fp32"] / 1e9,
        "ours_peak_mb": peaks["ours"] / 2 ** 20, "reference_peak_mb": peaks["reference"] / 2 ** 20,
        "ours_loss": check["ours"]["loss"], "reference_loss": check["reference"]["loss"], "loss_rel_diff": loss_rel,
        "ours_grad_norm": check["ours"]["grad_norm"], "reference_grad_norm": check["reference"]["grad_norm"],
        "grad_norm_rel_diff": grad_rel,
        "ours_step_s": times["ours"], "reference_step_s": times["reference"], "repeats": args.repeats,
        # CPU time of the process per step: with one thread, the step's cost net of waiting for a core
        "ours_cpu_s": cpu_times["ours"], "reference_cpu_s": cpu_times["reference"],
        "cpu_ratio": cpu_med["reference"] / cpu_med["ours"],
        "machine": machine(),
    }


def data_wait(args: argparse.Namespace, arch: str, batch: int, device: torch.device) -> Dict[str, Any]:
    """Run the real training loop (``DINOTrainer.train``: loader, multi-crop augmentation, step) on the images of
    ``--data-wait`` for a few steps and report how long the model waited for its crops (the loader's next batch
    plus the augmentation, which runs on the training device before each step), as a fraction of the time."""
    flags = {"model.arch": arch, "optim.batch_size": batch, "head.out_dim": args.out_dim,
             "crops.global_size": args.global_size, "crops.local_size": args.local_size,
             "crops.local_number": args.local_crops, "train.device": str(device), "train.precision": args.precision,
             "train.threads": torch.get_num_threads() if device.type == "cpu" else None,
             "train.max_steps": args.data_steps, "optim.epochs": 1, "train.seed": args.seed,
             "data.source": str(args.data_wait), "data.limit": batch * args.data_steps, "modality": args.modality}
    cfg = build_config(ROOT / "configs" / "pretrain" / "default.yaml", None, flags, args.set)
    with tempfile.TemporaryDirectory(prefix="vfm_bench_data_") as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        summary = DINOTrainer(cfg, out).train()
    return {"arch": arch, "batch_size": batch, "data": summary["data"], "steps": summary["steps_this_run"],
            "data_wait_fraction": summary.get("data_wait_fraction"),
            "data_wait_fraction_max": summary.get("data_wait_fraction_max"),
            "seconds": summary["seconds_this_run"], "threads": torch.get_num_threads()}


def print_table(rows: List[Dict[str, Any]]) -> None:
    head = (f"{'arch':<10} {'batch':>5} {'ours img/s':>10} {'ref img/s':>9} {'ratio':>6} {'MFU':>6} {'ref MFU':>7} "
            f"{'CPU-time ratio':>14} {'MFU':>5} {'ref':>5} {'peak MB ours/ref':>17} {'loss ours / ref':>21}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['arch']:<10} {r['batch_size']:>5} {r['ours_images_per_s']:>10.2f} {r['reference_images_per_s']:>9.2f} "
              f"{r['ratio']:>5.2f}x {100 * r['mfu']:>5.1f}% {100 * r['reference_mfu']:>6.1f}% "
              f"{r['cpu_ratio']:>13.2f}x {100 * r['mfu_cpu_time']:>4.0f}% {100 * r['reference_mfu_cpu_time']:>4.0f}% "
              f"{r['ours_peak_mb']:>8.0f}/{r['reference_peak_mb']:<8.0f} "
              f"{r['ours_loss']:>10.6f}/{r['reference_loss']:<10.6f}")
    m = rows[0]["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}"
          + (f", GPU {m['gpu']}" if "gpu" in m else "") + f"; bf16/fp32 matmul ceiling (median) "
          + ", ".join(f"{r['ceiling_bf16_gflops']:.0f}/{r['ceiling_fp32_gflops']:.0f}" for r in rows) + " GFLOP/s")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=["vit_tiny", "vit_small"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[16, 32])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (median reported)")
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--precision", default="auto", help="ours: auto | bf16 | fp16 | fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", default="auto",
                   help="CPU intra-op threads for both implementations: a number, 'default' (torch's choice: one per "
                        "core) or 'auto' (the faster of 1 and torch's choice on this machine right now; on cores shared "
                        "with busy jobs one thread is much faster, see visionfm.engine.dino_trainer.fastest_cpu_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the pretraining config for ours (and the reference where it applies)")
    p.add_argument("--json", type=Path, default=None, help="write the figures (a list, one entry per case) here")
    p.add_argument("--data-wait", type=Path, default=None, metavar="FOLDER",
                   help="instead of the step comparison: run the real training loop on the images in FOLDER and "
                        "report the fraction of time the model waits for data (loader + augmentation)")
    p.add_argument("--data-steps", type=int, default=4, help="steps of the --data-wait run (the first is not counted)")
    p.add_argument("--modality", default="cfp", help="modality of the --data-wait images")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and args.threads != "default":
        ours_dtype, _ = resolve_precision(args.precision, device)  # probe in the dtype our training step runs in
        torch.set_num_threads(fastest_cpu_threads(dtype=ours_dtype) if args.threads == "auto" else int(args.threads))
    if args.data_wait:
        waits = [data_wait(args, arch, batch, device) for arch in args.arch for batch in args.batch_size]
        for w in waits:
            print(f"{w['arch']} batch {w['batch_size']}: the model waited for data {100 * w['data_wait_fraction']:.1f} % "
                  f"of the time (worst step {100 * w['data_wait_fraction_max']:.1f} %) over {w['steps'] - 1} steps "
                  f"on {w['data']}, {w['threads']} threads")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(waits, indent=1))
        return 0
    rows, failures = [], []
    for arch in args.arch:
        for batch in args.batch_size:
            t0 = time.perf_counter()
            row = run_case(args, arch, batch, device)
            row["case_wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(f"{arch} batch {batch}: loss ours {row['ours_loss']:.6f} reference {row['reference_loss']:.6f} "
                  f"(rel diff {row['loss_rel_diff']:.2e}); grad norm ours {row['ours_grad_norm']:.5f} reference "
                  f"{row['reference_grad_norm']:.5f} (rel diff {row['grad_norm_rel_diff']:.2e}); "
                  f"{row['case_wall_s']:.0f} s", flush=True)
            # bf16 keeps 8 significant bits (relative rounding 2^-8); far beyond that means the steps differ.
            if row["loss_rel_diff"] > 2 ** -8 or row["grad_norm_rel_diff"] > 0.05:
                failures.append(f"{arch} batch {batch}: ours and the reference disagree beyond bf16 rounding")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
