"""benchmarks/gpu_pretrain.sh and benchmarks/gpu_corpus.py: the carried payload (size budget, sizes, CSV) and the
run path end to end on the CPU (``run --cpu``), on a tiny generated corpus laid out like the named sources."""

import base64
import csv
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_pretrain.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_corpus  # noqa: E402

CFP_SOURCES = "EyeDisease4:train,TVHL:cfp,DRIVE:train"


def _fundus(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A disc of smooth colour with fine noise (so that JPEG sizes grow with the stored size)."""
    coarse = rng.integers(40, 220, size=(height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    img = img + rng.integers(-12, 13, size=img.shape)
    yy, xx = np.mgrid[:height, :width]
    img[(yy - height / 2) ** 2 + (xx - width / 2) ** 2 > (min(width, height) / 2) ** 2] = 0
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_data")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        folder = root / "EyeDisease4" / "train" / cls
        folder.mkdir(parents=True)
        for i in range(3):
            _fundus(rng, 400, 400 if i else 266).save(folder / f"{cls}{i}.jpg", quality=95)
    tvhl = root / "pretrain" / "cfp" / "TVHL-other-patients"
    tvhl.mkdir(parents=True)
    for i in range(3):
        _fundus(rng, 384, 384).save(tvhl / f"t{i}.jpg", quality=95)
    drive = root / "DRIVE" / "training" / "images"
    drive.mkdir(parents=True)
    for i in range(2):
        _fundus(rng, 565, 584).save(drive / f"{21 + i}_training.tif")
    oct_dir = root / "pretrain" / "oct" / "TVHL-other-patients"
    oct_dir.mkdir(parents=True)
    for i in range(3):
        scan = np.clip(np.linspace(0, 200, 286)[:, None] + rng.normal(0, 20, (286, 704)), 0, 255).astype(np.uint8)
        Image.fromarray(scan).save(oct_dir / f"o{i}.jpg", quality=95)
    return root


def _fake_wheel(folder: Path) -> Path:
    """A tiny pure-Python wheel, so that the run step's offline install is exercised without the network."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vfm_fake_pkg/__init__.py": b"VALUE = 1\n",
             "vfm_fake_pkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: vfm-fake-pkg\nVersion: 0.1\n",
             "vfm_fake_pkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                 b"Tag: py3-none-any\n"}
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("vfm_fake_pkg-0.1.dist-info/RECORD,,")
    files["vfm_fake_pkg-0.1.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / "vfm_fake_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return folder


def _payload_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def payloads(data_root, tmp_path_factory):
    """A payload with room for the largest size (through the shell script), then one with about half the room."""
    tmp = tmp_path_factory.mktemp("gpu_payloads")
    wheels = _fake_wheel(tmp / "wheels_src")
    big = tmp / "big"
    proc = subprocess.run(["bash", str(SCRIPT), "prepare", "--modality", "cfp", "--data-root", str(data_root),
                           "--sources", CFP_SOURCES, "--budget-mib", "50", "--wheels-from", str(wheels),
                           "--out", str(big)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads((big / "payload.json").read_text())
    budget = (_payload_bytes(big) - info["image_bytes"] + 0.5 * info["image_bytes"] + 70 * 1024) / 2 ** 20
    small = tmp / "small"
    assert gpu_corpus.main(["prepare", "--modality", "cfp", "--data-root", str(data_root), "--sources", CFP_SOURCES,
                            "--budget-mib", str(budget), "--wheels-from", str(wheels), "--out", str(small)]) == 0
    return big, small, budget


def test_prepare_picks_the_largest_size_that_fits_the_budget(payloads):
    big, small, budget = payloads
    big_info = json.loads((big / "payload.json").read_text())
    assert big_info["size"] == [384, 384] and big_info["quality"] == 90 and big_info["count"] == 11
    info = json.loads((small / "payload.json").read_text())
    assert info["count"] == 11
    assert tuple(info["size"]) in gpu_corpus.SIZES["cfp"] and info["size"][0] < 384
    assert _payload_bytes(small) <= budget * 2 ** 20
    assert info["wheels"] == ["vfm_fake_pkg-0.1-py3-none-any.whl"]
    assert (small / "stubs" / "kornia_rs" / "__init__.py").is_file()
    manifest = (small / "MANIFEST").read_text()
    for source, count in (("EyeDisease4:train", 6), ("TVHL:cfp", 3), ("DRIVE:train", 2)):
        assert f"{source}\t{count}\t{info['size'][1]}x{info['size'][0]}\t" in manifest
    with open(small / "images.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11
    for row in rows:
        assert not os.path.isabs(row["path"])
        with Image.open(small / row["path"]) as img:
            img.load()
            assert img.format == "JPEG" and img.mode == "RGB"
            assert img.size == (info["size"][1], info["size"][0])


def test_prepare_oct_keeps_the_bscan_frame_and_limit(data_root, tmp_path):
    out = tmp_path / "oct"
    assert gpu_corpus.main(["prepare", "--modality", "oct", "--data-root", str(data_root), "--sources", "TVHL:oct",
                            "--limit", "2", "--no-wheels", "--budget-mib", "5", "--out", str(out)]) == 0
    info = json.loads((out / "payload.json").read_text())
    assert info["count"] == 2 and info["size"] == [256, 640] and info["wheels"] == []
    rows = list(csv.DictReader(open(out / "images.csv", newline="")))
    with Image.open(out / rows[0]["path"]) as img:
        assert img.size == (640, 256) and img.mode == "L"


def test_prepare_refuses_a_budget_nothing_fits(data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        gpu_corpus.main(["prepare", "--modality", "cfp", "--data-root", str(data_root), "--sources", "TVHL:cfp",
                         "--no-wheels", "--budget-mib", "0.08", "--out", str(tmp_path / "p")])
    assert err.value.code == 1
    assert "do not fit" in capsys.readouterr().err


def test_run_refuses_a_payload_of_another_modality(payloads, tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--modality", "oct", "--cpu", "--payload", str(payloads[1])],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OUT": str(tmp_path / "o")})
    assert proc.returncode == 2 and "holds cfp images" in proc.stdout + proc.stderr


def test_run_cpu_end_to_end_gives_a_loadable_encoder(payloads, tmp_path):
    """Install (the fake wheel), versions and the mm*-free import check, probe, plan, iBOT run, results split into
    parts (as a ViT-S's would be), joined back, loaded with load_encoder."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--modality", "cfp", "--objective", "ibot", "--cpu",
                           "--payload", str(payloads[1]), "--part-mib", "4"],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert {"config.yaml", "run.log", "summary.json", "tensorboard.tar"} <= set(names)
    parts = [n for n in names if n.startswith("encoder.safetensors.part")]
    assert len(parts) >= 2 and all((out / n).stat().st_size <= 4 * 2 ** 20 for n in parts)
    assert len(names) <= 8  # what comes back from the device machine
    summary = json.loads((out / "summary.json").read_text())
    assert summary["summary"]["global_step"] == 6
    assert summary["plan"]["epochs"] >= 1 and summary["plan"]["batch"] == 4
    assert summary["versions"]["mm_modules_imported"] == []
    assert "vfm_fake_pkg" in summary["versions"]["carried"]
    assert "--device cpu" in summary["command"] and "train.max_seconds=360" in summary["command"]
    assert "probe:" in (out / "run.log").read_text()

    from visionfm import load_encoder

    target = tmp_path / "back" / "encoder.safetensors"
    assert gpu_corpus.main(["join", str(out), "--output", str(target)]) == 0
    encoder, info = load_encoder("cfp", weights=target)
    assert info.arch == "vit_tiny" and info.metadata["objective"] == "ibot" and info.metadata["dtype"] == "float16"
    assert (target.parent / "summary.json").is_file()


def test_plan_fits_the_schedule_to_the_time_budget(tmp_path, capsys):
    """Probe: 12 steps at 0.1 s and 3 epochs in 2.7 s, so 0.5 s per epoch beyond the steps (checkpoints). 800
    images in batches of 8: 100 steps, 10.5 s per epoch; 95 % of 100 s holds 9 epochs, one of them warm-up."""
    from torch.utils.tensorboard import SummaryWriter

    probe = tmp_path / "probe"
    writer = SummaryWriter(str(probe / "tensorboard"))
    for step in range(1, 13):
        writer.add_scalar("train/images_per_s", 80.0, step)
    writer.close()
    log = tmp_path / "probe.log"
    log.write_text('noise\n{"global_step": 12, "epoch": 3, "steps_this_run": 12, "seconds_this_run": 2.7}\n')
    assert gpu_corpus.main(["plan", "--probe-dir", str(probe), "--probe-log", str(log), "--images", "800", "--batch",
                            "8", "--seconds", "100", "--objective", "ibot", "--json", str(tmp_path / "plan.json")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "9 1"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["steps_per_epoch"] == 100 and abs(plan["epoch_overhead_s"] - 0.5) < 1e-6
