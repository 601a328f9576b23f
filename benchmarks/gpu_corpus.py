#!/usr/bin/env python
"""Helper of ``benchmarks/gpu_pretrain.sh``: the carried pretraining payload and the steps of a lent-GPU run.

Subcommands (the shell script calls them; each can be run by hand):

* ``prepare``  downsized JPEG copy of one modality's pretraining corpus + the wheels the GPU image lacks, within a
  size budget, into ``gpu_payload/`` (``images/``, ``images.csv``, ``MANIFEST``, ``payload.json``, ``wheels/``,
  ``stubs/``).
* ``env``      print (and record) Python, torch, CUDA, GPU and library versions; check that the pretraining import
  path loads without mmcv/mmseg/mmdet/mmengine; refuse ``--device cuda`` without a GPU.
* ``plan``     from a short probe run (step time, per-epoch checkpoint cost), the number of epochs whose full
  schedule (warm-up, cosine) fits the time budget.
* ``finish``   copy a run's results into ``$OUT`` within what comes back from the GPU machine (at most 8 files of
  16 MiB): fp16 encoder (split into parts when larger), config, summary JSON, TensorBoard tar.
* ``join``     put a split encoder back together (checks its sha256) next to the summary and config.

Only the standard library is imported at the top, so ``prepare`` and ``--help`` answer quickly.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
#: What one call of the device tool may carry: tracked + untracked-not-ignored files + carried paths.
TRAVEL_LIMIT = 64 * MIB
#: Room kept free under that limit for files others add before the run.
TRAVEL_MARGIN = int(1.5 * MIB)

#: The pretraining corpus of each modality (named sources under --data-root; training splits only).
CORPUS = {
    "cfp": "EyeDisease4:train,TVHL:cfp,DRIVE:train,IDRiD:train,OCT_DME:train",
    "oct": "TVHL:oct,OCT_DME:train",
}
#: Stored sizes (height, width), largest first, tried at quality 90; the last one then at lower qualities.
#: Fundus images are stored as their central square (what the trainer keeps of them, modality square_crop
#: "center"); B-scans are stretched to a fixed frame near their own aspect (square_crop "stretch"), as the trainer
#: does. The smallest size still holds a 224-pixel global crop without upsampling.
SIZES = {
    "cfp": [(384, 384), (320, 320), (288, 288), (256, 256), (240, 240), (224, 224)],
    "oct": [(256, 640), (240, 600), (224, 560)],
}
QUALITY = 90
LOWER_QUALITIES = (88, 85, 80, 75)
#: Wheels the GPU image lacks (its python3 has torch, timm, tensorboard, safetensors, pillow, pyyaml, numpy, tqdm).
WHEELS = ("lightly", "kornia")
#: Warm-up share of the schedule, as in the default configs (DINO 10 of 100 epochs, MAE 40 of 800).
WARMUP_FRACTION = {"dino": 0.1, "ibot": 0.1, "mae": 0.05}
MM_MODULES = ("mmcv", "mmseg", "mmdet", "mmengine")

KORNIA_RS_STUB_INIT = '''"""Stand-in for the kornia_rs binary package (carried by benchmarks/gpu_pretrain.sh).

kornia imports kornia_rs only in kornia.io (image file reading), which pretraining never calls: visionfm reads files
with PIL and uses kornia.augmentation. A real kornia_rs wheel installed next to this stub takes precedence.
"""
__version__ = "0.0.0+visionfm.stub"
'''
KORNIA_RS_STUB_IO = '''"""kornia_rs.io stand-in: any use names the stub (see kornia_rs/__init__.py)."""


def __getattr__(name):
    raise ImportError(f"kornia_rs.io.{name}: this is visionfm's stub of kornia_rs (pretraining does not read files "
                      "through kornia); carry the real wheel (prepare --kornia-rs-wheel) to use kornia.io")
'''


def log(msg: str) -> None:
    print(f"[gpu_corpus] {msg}", flush=True)


def fail(msg: str, code: int = 1) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _mib(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


# ------------------------------------------------------------------------------------------------ prepare
def travelling_bytes(repo: Path, exclude: Path) -> Optional[int]:
    """Bytes of what a device call sends besides the payload: tracked and untracked-not-ignored files (read-only
    ``git ls-files``). ``None`` when git cannot tell."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    exclude = exclude.resolve()
    for name in out.decode("utf-8", "surrogateescape").split("\0"):
        if not name:
            continue
        path = repo / name
        try:
            if exclude == path.resolve() or exclude in path.resolve().parents:
                continue
            total += path.stat().st_size
        except OSError:  # deleted but still tracked
            continue
    return total


def _installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def fetch_wheels(wheel_dir: Path, wheels_from: Optional[Path], kornia_rs_wheel: bool, python_version: str,
                 names: Sequence[str] = WHEELS) -> None:
    """Put lightly's and kornia's wheels (the versions installed here) into ``wheel_dir``: copied from
    ``wheels_from``, kept when already there, else ``pip download``-ed (no dependencies: the GPU image has torch,
    numpy, tqdm, ...). With ``kornia_rs_wheel`` also the binary kornia_rs wheel for CPython ``python_version``
    (manylinux x86_64; about 5 MiB), which otherwise travels as a stub."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if wheels_from is not None:
        for old in wheel_dir.glob("*.whl"):
            old.unlink()
        found = sorted(Path(wheels_from).glob("*.whl"))
        if not found:
            fail(f"--wheels-from {wheels_from}: no .whl files there")
        for whl in found:
            shutil.copy2(whl, wheel_dir / whl.name)
        log(f"wheels copied from {wheels_from}: {', '.join(w.name for w in found)}")
        return
    wanted = {name: _installed_version(name) for name in names}
    if kornia_rs_wheel:
        wanted["kornia_rs"] = _installed_version("kornia_rs")
    have = {w.name for w in wheel_dir.glob("*.whl")}
    for old in list(wheel_dir.glob("*.whl")):  # other versions, or a kornia_rs that is no longer wanted
        dist, ver = old.name.split("-")[:2]
        if wanted.get(dist.lower().replace("-", "_")) != ver:
            old.unlink()
    have = {w.name.split("-")[0].lower(): w.name for w in wheel_dir.glob("*.whl")}
    missing_pure = [f"{n}=={v}" for n, v in wanted.items() if n != "kornia_rs" and n not in have]
    pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
           "--only-binary=:all:", "-d", str(wheel_dir)]
    if missing_pure:
        log(f"downloading {' '.join(missing_pure)}")
        subprocess.run(pip + missing_pure, check=True)
    if kornia_rs_wheel and "kornia_rs" not in have:
        tag = python_version.replace(".", "")
        log(f"downloading kornia_rs=={wanted['kornia_rs']} for cp{tag} manylinux x86_64")
        subprocess.run(pip + ["--python-version", python_version, "--implementation", "cp", "--abi", f"cp{tag}",
                              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                              f"kornia_rs=={wanted['kornia_rs']}"], check=True)
    log("wheels: " + ", ".join(sorted(w.name for w in wheel_dir.glob("*.whl"))))


def write_stubs(stub_dir: Path) -> None:
    pkg = stub_dir / "kornia_rs"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(KORNIA_RS_STUB_INIT)
    (pkg / "io.py").write_text(KORNIA_RS_STUB_IO)


def frame_image(path: Path, modality: str, size: Tuple[int, int]):
    """The image as the trainer caches it (PIL, mode RGB or L): fundus central square, B-scan stretched, resized
    to ``size`` (height, width) with bicubic antialiasing."""
    import numpy as np
    from PIL import Image

    from visionfm.data.io import read_image

    height, width = size
    channels = 1 if modality == "oct" else 3
    arr = read_image(path, channels=channels, min_size=max(height, width))
    if modality != "oct":  # central region of the target's aspect (a square), as fit_and_resize(mode="center")
        h, w = arr.shape[:2]
        if w * height > h * width:
            cw = max(1, int(round(h * width / height)))
            arr = arr[:, (w - cw) // 2:(w - cw) // 2 + cw]
        elif w * height < h * width:
            ch = max(1, int(round(w * height / width)))
            arr = arr[(h - ch) // 2:(h - ch) // 2 + ch]
    img = Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if channels == 1 else arr))
    return img.resize((width, height), Image.BICUBIC)


def encode(img, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _options(modality: str) -> List[Tuple[Tuple[int, int], int]]:
    sizes = SIZES[modality]
    return [(s, QUALITY) for s in sizes] + [(sizes[-1], q) for q in LOWER_QUALITIES]


def _sample(items: Sequence[Any], n: int) -> List[Any]:
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def prepare(args: argparse.Namespace) -> int:
    modality = args.modality
    spec = args.sources or CORPUS[modality]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from visionfm.data.sources import SOURCES, resolve_named_source
    from visionfm.data.unlabeled import DataError

    # 1. wheels (they count towards the budget) and the kornia_rs stub
    wheel_dir = out / "wheels"
    if args.no_wheels:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    else:
        fetch_wheels(wheel_dir, Path(args.wheels_from) if args.wheels_from else None, args.kornia_rs_wheel,
                     args.python_version)
    write_stubs(out / "stubs")

    # 2. budget
    rest = travelling_bytes(REPO, out)
    if args.budget_mib is not None:
        budget = int(args.budget_mib * MIB)
    elif rest is None:
        budget = 30 * MIB
        log("git cannot list the working tree: budget 30 MiB")
    else:
        budget = min(40 * MIB, TRAVEL_LIMIT - TRAVEL_MARGIN - rest)
        log(f"budget (auto): 64 MiB - {_mib(rest)} of tracked/untracked files - {_mib(TRAVEL_MARGIN)} margin = "
            f"{_mib(budget)}")
    for old in ("images.csv", "MANIFEST", "payload.json"):
        (out / old).unlink(missing_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)
    fixed = _folder_bytes(out)  # wheels + stubs
    room = budget - fixed - 64 * 1024  # CSV, MANIFEST, payload.json
    if room <= 0:
        fail(f"budget {_mib(budget)} is used up by the wheels and stubs ({_mib(fixed)})")

    # 3. the corpus
    per_source: List[Tuple[str, List[Path]]] = []
    try:
        for token in (t.strip() for t in spec.split(",") if t.strip()):
            if token not in SOURCES:
                fail(f"unknown source {token!r}; known: {', '.join(SOURCES)}")
            files = resolve_named_source(token, args.data_root, modality)
            per_source.append((token, files[:args.limit] if args.limit else files))
    except DataError as err:
        fail(str(err))
    everything = [(token, f) for token, files in per_source for f in files]
    if not everything:
        fail("no images")
    log(f"{modality}: {len(everything)} images from {spec}" + (f" (at most {args.limit} per source)" if args.limit
                                                                else ""))

    # 4. the largest size (then the highest quality) whose estimate fits; encode; step down if it does not
    options = _options(modality)
    sample = _sample(everything, args.sample)
    choice = None
    for i, (size, quality) in enumerate(options):
        est = sum(len(encode(frame_image(f, modality, size), quality)) for _, f in sample)
        est = est / len(sample) * len(everything) * 1.02
        log(f"estimate at {size[1]}x{size[0]} q{quality}: {_mib(est)} (room {_mib(room)})")
        if est <= room:
            choice = i
            break
    if choice is None:
        fail(f"{len(everything)} images do not fit {_mib(budget)} even at {options[-1][0][1]}x{options[-1][0][0]} "
             f"JPEG q{options[-1][1]}: raise --budget-mib or pass --limit")
    start = time.perf_counter()
    while True:
        size, quality = options[choice]
        shutil.rmtree(out / "images", ignore_errors=True)
        rows, counts, total = [], {}, 0
        for n, (token, f) in enumerate(everything):
            folder = out / "images" / token.replace(":", "_")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{n:05d}_{f.stem[:40]}.jpg"
            data = encode(frame_image(f, modality, size), quality)
            target.write_bytes(data)
            total += len(data)
            rows.append(target.relative_to(out).as_posix())
            c = counts.setdefault(token, [0, 0])
            c[0] += 1
            c[1] += len(data)
            if total > room:
                break
        if total <= room:
            break
        if choice + 1 >= len(options):
            fail(f"the images do not fit {_mib(budget)}: raise --budget-mib or pass --limit")
        log(f"{size[1]}x{size[0]} q{quality} outgrew the room after {len(rows)} images: one size/quality down")
        choice += 1
    log(f"encoded {len(rows)} images at {size[1]}x{size[0]} q{quality} in {time.perf_counter() - start:.0f} s: "
        f"{_mib(total)}")

    with open(out / "images.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path"])
        writer.writerows([r] for r in rows)
    wheels = sorted(w.name for w in wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    lines = [f"# visionfm GPU pretraining payload: {modality}, {spec}" + (f", at most {args.limit} per source"
                                                                          if args.limit else ""),
             f"# JPEG quality {quality}; size = width x height as stored (fundus: central square; OCT: whole B-scan)",
             "source\tcount\tsize\tbytes"]
    lines += [f"{token}\t{c}\t{size[1]}x{size[0]}\t{b}" for token, (c, b) in counts.items()]
    lines += [f"TOTAL images\t{len(rows)}\t{size[1]}x{size[0]}\t{total}"]
    lines += [f"wheel\t1\t-\t{(wheel_dir / w).stat().st_size}\t{w}" for w in wheels]
    (out / "MANIFEST").write_text("\n".join(lines) + "\n")
    payload = {"format": "visionfm-gpu-payload/1", "modality": modality, "sources": spec, "limit": args.limit,
               "count": len(rows), "size": list(size), "quality": quality, "image_bytes": total,
               "per_source": {t: {"count": c, "bytes": b} for t, (c, b) in counts.items()},
               "wheels": wheels, "budget_bytes": budget, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "payload.json").write_text(json.dumps(payload, indent=1) + "\n")
    payload["payload_bytes"] = _folder_bytes(out)
    (out / "payload.json").write_text(json.dumps(payload, indent=1) + "\n")
    size_all = _folder_bytes(out)
    log(f"payload {out}: {_mib(size_all)} in all ({_mib(total)} images, "
        f"{_mib(_folder_bytes(wheel_dir))} wheels) of a {_mib(budget)} budget")
    if size_all > budget:
        fail(f"payload {_mib(size_all)} exceeds the budget {_mib(budget)}")
    if rest is not None:
        travel = rest + size_all
        log(f"a device call carrying it sends about {_mib(travel)} of the 64 MiB limit")
        if travel > TRAVEL_LIMIT:
            fail(f"working tree + payload = {_mib(travel)} > 64 MiB: lower --budget-mib")
    return 0


# ------------------------------------------------------------------------------------------------ env
def env(args: argparse.Namespace) -> int:
    import importlib
    import multiprocessing
    import platform

    info: Dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable,
                            "start_method": multiprocessing.get_start_method(allow_none=False)}
    import torch

    info["torch"] = torch.__version__
    info["cuda_build"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        info["bf16"] = torch.cuda.is_bf16_supported()
        info["cudnn"] = torch.backends.cudnn.version()
    for name in ("timm", "lightly", "kornia", "kornia_rs", "numpy", "safetensors", "tensorboard", "PIL", "yaml"):
        try:
            mod = importlib.import_module(name)
            info[name] = f"{getattr(mod, '__version__', '?')} ({Path(mod.__file__).parent})"
        except Exception as err:  # noqa: BLE001  (report any failure)
            info[name] = f"MISSING: {err.__class__.__name__}: {err}"
    if args.site and Path(args.site).is_dir():
        info["carried"] = sorted(p.name for p in Path(args.site).iterdir() if not p.name.endswith(".dist-info")
                                 and p.name != "bin" and not p.name.startswith((".", "__")))
    sys.path.insert(0, str(REPO))
    problems = []
    for name in ("visionfm.pretrain_cli", "visionfm.pretrain_mae_cli", "visionfm.engine.dino_trainer",
                 "visionfm.engine.mae_trainer", "visionfm.data.augment", "visionfm.objectives.ibot",
                 "visionfm.objectives.mae"):
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001
            problems.append(f"import {name}: {err.__class__.__name__}: {err}")
    mm = sorted(m for m in sys.modules if m.split(".")[0] in MM_MODULES)
    info["mm_modules_imported"] = mm
    if mm:
        problems.append(f"the pretraining import path imported {mm[:5]} (mmcv/mmseg/mmdet are not needed here)")
    for key, value in info.items():
        print(f"  {key:20s} {value}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
    if args.device.startswith("cuda") and not info["cuda_available"]:
        problems.append("--device cuda but torch sees no GPU (pass --cpu for the CPU path)")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


# ------------------------------------------------------------------------------------------------ plan
def _summary_line(log_path: Path) -> Dict[str, Any]:
    """The JSON summary a pretraining command prints last."""
    for line in reversed(Path(log_path).read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith('{"global_step"'):
            return json.loads(line)
    raise ValueError(f"{log_path}: no summary line")


def _step_scalars(run_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("train/images_per_s",) if tag in tags}


def plan(args: argparse.Namespace) -> int:
    summary = _summary_line(Path(args.probe_log))
    batch, images, seconds = args.batch, args.images, float(args.seconds)
    steps = int(summary["steps_this_run"])
    epochs_done = max(1, int(summary["epoch"]))
    wall = float(summary["seconds_this_run"])
    method = "tensorboard"
    try:
        scalars = _step_scalars(Path(args.probe_dir))
        # images_per_s times the step itself (augmentation included: on a GPU it may synchronise). What the step
        # waited for the loader is left in the residual with the checkpoints: with loader workers and cached images
        # it is the first batch of each epoch (workers restart), not a per-step cost.
        per_step = [batch / max(v, 1e-9) for _, v in sorted(scalars["train/images_per_s"])]
        steady = sorted(per_step[2:] or per_step)[len(per_step[2:] or per_step) // 2]
        overhead = max(0.0, (wall - sum(per_step)) / epochs_done)  # checkpoint, loader start, epoch bookkeeping
    except Exception as err:  # noqa: BLE001  (no TensorBoard reader: the whole probe's mean, warm-up included)
        method = f"mean of the probe ({err.__class__.__name__})"
        steady, overhead = wall / max(steps, 1), 0.0
    steps_per_epoch = max(1, images // batch)
    epoch_s = steps_per_epoch * steady + overhead
    epochs = max(1, int(seconds * args.fill / epoch_s))
    warmup = 0 if epochs < 2 else min(epochs - 1, max(1, int(round(epochs * WARMUP_FRACTION[args.objective]))))
    result = {"images": images, "batch": batch, "steps_per_epoch": steps_per_epoch, "step_s": round(steady, 4),
              "epoch_overhead_s": round(overhead, 3), "epoch_s": round(epoch_s, 3), "seconds": seconds,
              "epochs": epochs, "warmup_epochs": warmup, "expected_steps": epochs * steps_per_epoch,
              "images_per_s": round(batch / steady, 1), "method": method,
              "probe": {"steps": steps, "epochs": epochs_done, "seconds": wall}}
    log(f"plan: {steady * 1000:.0f} ms/step ({batch / steady:.0f} images/s), {overhead:.2f} s per epoch for "
        f"checkpoint and loader start ({method}); {steps_per_epoch} steps/epoch -> {epochs} epochs "
        f"({warmup} warm-up) in {seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(epochs, warmup)
    return 0


# ------------------------------------------------------------------------------------------------ finish / join
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finish(args: argparse.Namespace) -> int:
    run, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: Dict[str, Any] = {"format": "visionfm-gpu-run/1", "command": args.command}
    for key, path in (("summary", args.run_log), ):
        try:
            result[key] = _summary_line(Path(path))
        except (OSError, ValueError) as err:
            result[key] = None
            result["error"] = f"no summary: {err}"
    for key, path in (("plan", args.plan), ("versions", args.versions), ("payload", args.payload)):
        try:
            result[key] = json.loads(Path(path).read_text()) if path else None
        except (OSError, ValueError):
            result[key] = None
    if (run / "config.yaml").is_file():
        shutil.copy2(run / "config.yaml", out / "config.yaml")
    if (run / "tensorboard").is_dir():
        with tarfile.open(out / "tensorboard.tar", "w") as tar:
            tar.add(run / "tensorboard", arcname="tensorboard")
    # The fp16 export (export.to): an fp32 ViT-S (86 MiB) cannot come back (16 MiB per file, 64 MiB in all).
    fp16 = sorted((run / "export").glob("*.safetensors")) if (run / "export").is_dir() else []
    if fp16:
        src = fp16[0]
        size = src.stat().st_size
        part = int(args.part_mib * MIB)
        enc: Dict[str, Any] = {"dtype": "float16", "bytes": size, "sha256": _sha256(src),
                               "fp32_in_run_folder": str(run / "encoder.safetensors")}
        if size <= part:
            shutil.copy2(src, out / "encoder.safetensors")
            enc["files"] = ["encoder.safetensors"]
        else:
            names = []
            with open(src, "rb") as fh:
                for i, chunk in enumerate(iter(lambda: fh.read(part), b"")):
                    name = f"encoder.safetensors.part{i}"
                    (out / name).write_bytes(chunk)
                    names.append(name)
            enc["files"] = names
            enc["join"] = ("python benchmarks/gpu_corpus.py join <files_at> --output runs/gpu/encoder.safetensors  "
                           "(or: cat encoder.safetensors.part* > encoder.safetensors, in numeric order)")
        if size > TRAVEL_LIMIT - 2 * MIB:
            enc["warning"] = "larger than what comes back from the GPU machine (64 MiB in all)"
        result["encoder"] = enc
    else:
        result["encoder"] = None
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"results in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0 if result["encoder"] and result.get("summary") else 1


def join(args: argparse.Namespace) -> int:
    src = Path(args.folder)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads((src / "summary.json").read_text()) if (src / "summary.json").is_file() else {}
    parts = sorted(src.glob("encoder.safetensors.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if parts:
        with open(output, "wb") as fh:
            for p in parts:
                fh.write(p.read_bytes())
    elif (src / "encoder.safetensors").is_file():
        shutil.copyfile(src / "encoder.safetensors", output)
    else:
        fail(f"{src}: no encoder.safetensors or encoder.safetensors.part* files")
    want = (summary.get("encoder") or {}).get("sha256")
    got = _sha256(output)
    if want and want != got:
        output.unlink()
        fail(f"sha256 mismatch: {got} != {want} in summary.json (a part is missing or damaged)")
    for name in ("summary.json", "config.yaml", "tensorboard.tar"):
        if (src / name).is_file():
            shutil.copyfile(src / name, output.parent / name)
    log(f"{output} ({_mib(output.stat().st_size)}, sha256 {'checked' if want else 'not recorded'})")
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_corpus.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="downsized corpus + wheels into the payload folder")
    p.add_argument("--modality", required=True, choices=sorted(CORPUS))
    p.add_argument("--data-root", default=os.environ.get("VISIONFM_DATA") or "../shared/data")
    p.add_argument("--sources", default=None, help="named sources (default: the modality's pretraining corpus)")
    p.add_argument("--budget-mib", type=float, default=None,
                   help="size of the whole payload (images, CSV, MANIFEST, wheels); default: what the 64 MiB a "
                        "device call carries leaves beside the working tree, less 1.5 MiB, at most 40")
    p.add_argument("--limit", type=int, default=None, help="at most N images per source (quick trials)")
    p.add_argument("--out", default=str(REPO / "gpu_payload"))
    p.add_argument("--sample", type=int, default=48, help="images encoded per size to estimate the total")
    p.add_argument("--no-wheels", action="store_true", help="carry no wheels")
    p.add_argument("--wheels-from", default=None, metavar="DIR", help="copy the wheels from DIR (no download)")
    p.add_argument("--kornia-rs-wheel", action="store_true",
                   help="carry the binary kornia_rs wheel (about 5 MiB) instead of relying on the stub")
    p.add_argument("--python-version", default="3.12", help="the GPU image's Python, for --kornia-rs-wheel")
    p = sub.add_parser("env", help="versions; the pretraining import path without mm*")
    p.add_argument("--device", default="cuda")
    p.add_argument("--site", default=None)
    p.add_argument("--json", default=None)
    p = sub.add_parser("plan", help="epochs that fit the time budget, from a probe run")
    p.add_argument("--probe-dir", required=True)
    p.add_argument("--probe-log", required=True)
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--objective", required=True, choices=sorted(WARMUP_FRACTION))
    p.add_argument("--fill", type=float, default=0.95, help="share of the budget the schedule is planned for")
    p.add_argument("--json", default=None)
    p = sub.add_parser("finish", help="results into $OUT")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--run-log", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plan", default=None)
    p.add_argument("--versions", default=None)
    p.add_argument("--payload", default=None)
    p.add_argument("--command", default=None)
    p.add_argument("--part-mib", type=float, default=15.0)
    p = sub.add_parser("join", help="reassemble a split encoder")
    p.add_argument("folder")
    p.add_argument("--output", default="runs/gpu/encoder.safetensors")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"prepare": prepare, "env": env, "plan": plan, "finish": finish, "join": join}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
