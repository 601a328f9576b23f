#!/usr/bin/env python
"""Helper of ``benchmarks/gpu_check.sh`` (the prepared GPU readiness check); each subcommand can run by hand.

* ``prepare``  the wheels the GPU image lacks (lightly, kornia, mmengine, pytest and its two dependencies: the
  versions installed here) and mmcv's source distribution into ``gpu_payload/`` (``wheels/``, ``sdist/``,
  ``stubs/``), through :func:`gpu_corpus.fetch_wheels`, the packing ``gpu_pretrain.sh`` uses.
* ``ops``      mmcv's compiled ``nms`` and ``sigmoid_focal_loss`` on the device, the focal loss in fp32, fp16 and
  bf16, each against a plain PyTorch computation; how ``precision_for_ops`` routes a focal-loss detector.
* ``compare``  two encoder files: bit-identical, or the largest difference (the exact-resume check).
* ``jpegs``    write N fundus-like JPEGs (for the data-wait measurement with decoding in loader workers).
* ``summary``  gather the JSON results under ``$OUT`` into ``summary.json`` with a pass/fail line per check.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

#: Pure-Python wheels the GPU image lacks: the pretraining stack (as gpu_pretrain.sh), mmcv's own Python
#: dependency, and pytest for the CUDA-marked tests.
CHECK_WHEELS = ("lightly", "kornia", "mmengine", "addict", "yapf", "termcolor", "pytest", "pluggy", "iniconfig")
MMCV_VERSION = "2.1.0"


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ prepare
def prepare(args: argparse.Namespace) -> int:
    import subprocess

    import gpu_corpus

    out = Path(args.out).resolve()
    gpu_corpus.fetch_wheels(out / "wheels", None, False, args.python_version, names=CHECK_WHEELS)
    gpu_corpus.write_stubs(out / "stubs")
    sdist = out / "sdist"
    sdist.mkdir(parents=True, exist_ok=True)
    if not list(sdist.glob(f"mmcv-{MMCV_VERSION}.tar.gz")):
        log(f"downloading the mmcv {MMCV_VERSION} source distribution (built with FORCE_CUDA=1 on the GPU machine)")
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--no-binary", ":all:", "--no-build-isolation", "-d", str(sdist), f"mmcv=={MMCV_VERSION}"],
                       check=True)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    rest = gpu_corpus.travelling_bytes(REPO, out)
    log(f"payload {out}: {total / 2 ** 20:.1f} MiB" + (f"; with the working tree a device call carries "
                                                        f"{(total + rest) / 2 ** 20:.1f} MiB of 64" if rest else ""))
    if rest is not None and total + rest > gpu_corpus.TRAVEL_LIMIT:
        log("error: more than a device call carries (64 MiB): remove images with 'rm -r gpu_payload/images'")
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ ops
def _load_mmcv_ext():
    """mmcv's compiled extension, loaded on its own: ``import mmcv`` needs OpenCV, which the GPU image may lack,
    while the kernels under test need only torch. Returns ``(module, where)`` or ``(None, reason)``."""
    import torch  # noqa: F401  (the extension links against torch's libraries)

    spec = importlib.util.find_spec("mmcv")
    if spec is None or not spec.submodule_search_locations:
        return None, "mmcv is not installed"
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("_ext*.so")):
            loader = importlib.machinery.ExtensionFileLoader("mmcv._ext", str(path))
            module = importlib.util.module_from_spec(importlib.util.spec_from_file_location("mmcv._ext", path,
                                                                                              loader=loader))
            loader.exec_module(module)
            return module, str(path)
    return None, "mmcv has no compiled ops (_ext)"


def _focal_reference(logits, target, gamma: float, alpha: float):
    import torch.nn.functional as F

    p = logits.float().sigmoid()
    onehot = F.one_hot(target, logits.shape[1] + 1)[:, :-1].float()  # class == num_classes: background
    ce = F.binary_cross_entropy_with_logits(logits.float(), onehot, reduction="none")
    pt = p * onehot + (1 - p) * (1 - onehot)
    return ce * (1 - pt) ** gamma * (alpha * onehot + (1 - alpha) * (1 - onehot))


def ops(args: argparse.Namespace) -> int:
    import torch

    device = torch.device(args.device)
    result: Dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda_build": torch.version.cuda}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
        result["capability"] = list(torch.cuda.get_device_capability(device))
    ext, where = _load_mmcv_ext()
    result["mmcv_ext"] = where
    checks: Dict[str, Any] = {}
    if ext is not None:
        gen = torch.Generator().manual_seed(0)
        xy = torch.rand(200, 2, generator=gen) * 100
        boxes = torch.cat([xy, xy + 10 + torch.rand(200, 2, generator=gen) * 30], 1)
        scores = torch.rand(200, generator=gen)
        try:
            import torchvision

            keep = ext.nms(boxes.to(device), scores.to(device), iou_threshold=0.5, offset=0)
            want = torchvision.ops.nms(boxes, scores, 0.5)
            checks["nms"] = {"ok": sorted(keep.cpu().tolist()) == sorted(want.tolist()), "kept": int(keep.numel())}
        except Exception as err:  # noqa: BLE001  (the point is to record what fails)
            checks["nms"] = {"ok": False, "error": f"{err.__class__.__name__}: {str(err)[:300]}"}
        logits = torch.randn(64, 5, generator=gen)
        target = torch.randint(0, 6, (64,), generator=gen)
        want = _focal_reference(logits, target, 2.0, 0.25)
        for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
            entry: Dict[str, Any] = {}
            try:
                x = logits.to(device, dtype)
                out = x.new_zeros(x.shape)
                ext.sigmoid_focal_loss_forward(x, target.to(device), x.new_empty(0), out, gamma=2.0, alpha=0.25)
                err = (out.float().cpu() - want).abs().max().item()
                entry = {"ok": err < (1e-4 if dtype == torch.float32 else 2e-2), "max_abs_err": err}
            except Exception as exc:  # noqa: BLE001
                entry = {"ok": False, "error": f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}"}
            checks[f"sigmoid_focal_loss_{name}"] = entry
    result["ops"] = checks
    from visionfm.engine.precision import precision_for_ops

    if device.type == "cuda":
        dtype, scaler, why = precision_for_ops("auto", device, ["sigmoid_focal_loss"])
        result["retinanet_precision_auto"] = {"dtype": str(dtype), "grad_scaler": scaler, "why": why}
        # The fix holds when the dtype auto picks for a focal-loss head is one the kernel runs.
        picked = {torch.float16: "fp16", torch.bfloat16: "bf16", None: "fp32"}[dtype]
        result["retinanet_precision_auto"]["kernel_ok"] = checks.get(f"sigmoid_focal_loss_{picked}", {}).get("ok")
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for key, value in checks.items():
        log(f"{key}: {value}")
    log(f"mmcv extension: {where}")
    return 0


# ------------------------------------------------------------------------------------------------ compare
def compare(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    a, b = load_file(args.a), load_file(args.b)
    result: Dict[str, Any] = {"a": args.a, "b": args.b, "same_keys": a.keys() == b.keys()}
    if result["same_keys"]:
        diffs = {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}
        result["bit_identical"] = all(a[k].equal(b[k]) for k in a)
        result["max_abs_diff"] = max(diffs.values())
        result["worst"] = max(diffs, key=diffs.get)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    log(f"resume check: {result}")
    return 0


# ------------------------------------------------------------------------------------------------ jpegs
def jpegs(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    side = args.size
    yy, xx = np.mgrid[:side, :side]
    outside = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 > (side / 2) ** 2
    start = time.perf_counter()
    for i in range(args.count):
        coarse = rng.integers(30, 220, size=(side // 32, side // 32, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-10, 11, size=img.shape), 0, 255).astype(np.uint8)
        img[outside] = 0
        Image.fromarray(img).save(out / f"fundus_{i:04d}.jpg", quality=92)
    log(f"{args.count} JPEGs of {side} px in {out} ({time.perf_counter() - start:.1f} s)")
    return 0


# ------------------------------------------------------------------------------------------------ summary
def _read(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_summary(log_path: Path) -> Optional[Dict[str, Any]]:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.strip().startswith('{"global_step"'):
            return json.loads(line)
    return None


def summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    result: Dict[str, Any] = {"format": "visionfm-gpu-check/1", "mode": args.mode,
                              "versions": _read(out / "versions.json"), "checks": {}}
    checks: Dict[str, Any] = result["checks"]
    ops_result = _read(out / "ops.json") or {}
    result["ops"] = ops_result
    build = _read(out / "mmcv_build.json")
    result["mmcv_build"] = build
    op_checks = ops_result.get("ops") or {}
    wanted = ["nms", "sigmoid_focal_loss_fp16"] + (["sigmoid_focal_loss_bf16"] if args.mode == "cpu" else [])
    if args.mode == "gpu":
        checks["mmcv_cuda_ops"] = {"ok": all((op_checks.get(k) or {}).get("ok") for k in wanted) if op_checks
                                   else None, "detail": op_checks or ops_result.get("mmcv_ext")}
        checks["focal_loss_bf16_is_avoided"] = {
            "ok": (ops_result.get("retinanet_precision_auto") or {}).get("kernel_ok"),
            "detail": ops_result.get("retinanet_precision_auto")}
    else:  # mmcv's focal-loss kernel is CUDA only: on the CPU only its presence and nms are checked
        checks["mmcv_ops_cpu"] = {"ok": (op_checks.get("nms") or {}).get("ok") if op_checks else None,
                                  "detail": op_checks or ops_result.get("mmcv_ext")}
    for objective in ("dino", "ibot"):
        compared = _read(out / f"resume_{objective}.json") or {}
        straight = _last_summary(out / f"{objective}_straight.log") or {}
        exact = compared.get("bit_identical")
        close = compared.get("max_abs_diff") is not None and compared["max_abs_diff"] <= args.resume_tolerance
        checks[f"{objective}_exact_resume"] = {
            "ok": bool(exact or close) if compared else False, "bit_identical": exact,
            "max_abs_diff": compared.get("max_abs_diff"), "steps": straight.get("global_step"),
            "seconds_straight": straight.get("seconds_this_run")}
    bench = _read(out / "pretrain_step.json")
    result["pretrain_step"] = bench
    checks["pretrain_step_vs_reference"] = {
        "ok": bool(bench) and all(r.get("ratio") is not None or r.get("images_per_s") for r in bench),
        "rows": [{k: r.get(k) for k in ("arch", "batch_size", "ratio", "ours_images_per_s", "reference_images_per_s",
                                        "mfu", "reference_mfu") if k in r} for r in (bench or [])]}
    wait = _last_summary(out / "data_wait.log") or {}
    checks["data_wait_jpeg_workers"] = {"ok": "data_wait_fraction" in wait,
                                        "data_wait_fraction": wait.get("data_wait_fraction"),
                                        "data_wait_fraction_max": wait.get("data_wait_fraction_max"),
                                        "steps": wait.get("steps_this_run")}
    tests = _read(out / "cuda_tests.json") or {}
    checks["cuda_tests"] = tests
    failed = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is False]
    unknown = [k for k, v in checks.items() if isinstance(v, dict) and v.get("ok") is None]
    result["failed"], result["not_checked"] = failed, unknown
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    for key, value in checks.items():
        log(f"{'PASS' if value.get('ok') else 'FAIL' if value.get('ok') is False else 'n/a '} {key}: "
            f"{json.dumps({k: v for k, v in value.items() if k != 'ok'})[:300]}")
    log(f"summary in {out / 'summary.json'}: {len(failed)} failed ({', '.join(failed) or 'none'}); "
        f"not checked: {', '.join(unknown) or 'none'}")
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="wheels + mmcv sdist into the payload folder")
    p.add_argument("--out", default=str(REPO / "gpu_payload"))
    p.add_argument("--python-version", default="3.12")
    p = sub.add_parser("ops", help="mmcv nms and sigmoid focal loss on a device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", required=True)
    p = sub.add_parser("compare", help="two encoder files")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", required=True)
    p = sub.add_parser("jpegs", help="synthetic fundus JPEGs")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--size", type=int, default=512)
    p = sub.add_parser("summary", help="summary.json under --out")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--resume-tolerance", type=float, default=1e-3,
                   help="largest weight difference accepted as an exact resume when the bits differ (GPU kernels "
                        "such as attention backward may sum in another order)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"prepare": prepare, "ops": ops, "compare": compare, "jpegs": jpegs, "summary": summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
