"""``python -m visionfm.weights list | verify | convert`` on a temporary weights folder."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from timm.models.vision_transformer import VisionTransformer

from visionfm.weights import load_encoder, read_index, read_metadata, sha256_file
from visionfm.weights.cli import main

REPO = Path(__file__).resolve().parents[1]
IMG = 64


def small_vit(seed: int) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=IMG, patch_size=16, num_classes=0, dynamic_img_size=True, embed_dim=192,
                              depth=2, num_heads=3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def vfm_checkpoint(path: Path, teacher: VisionTransformer, modality: str = "Fundus") -> Path:
    """A VisionFM pretraining checkpoint (teacher/student with backbone./head. keys, args Namespace)."""
    backbone = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    head = {"head.mlp.0.weight": torch.randn(64, 192), "head.last_layer.weight_v": torch.randn(128, 64)}
    torch.save({"teacher": {**backbone, **head},
                "student": {f"module.{k}": v.clone() for k, v in {**backbone, **head}.items()},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 400,
                "args": argparse.Namespace(arch="vit_tiny", modality=modality, patch_size=16)}, path)
    return path


class _RunsCode:
    """Unpickling this calls ``os.system`` (the pickle names only ``os.system``, not this class)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture()
def converted(tmp_path):
    """A weights folder holding one converted VisionFM Fundus checkpoint."""
    teacher = small_vit(0)
    src = vfm_checkpoint(tmp_path / "VFM_Fundus_weights.pth", teacher)
    wdir = tmp_path / "weights"
    assert main(["convert", str(src), "--modality", "Fundus", "--weights-dir", str(wdir)]) == 0
    return wdir, teacher, src


def test_convert_writes_safetensors_metadata_and_index(capsys, converted):
    wdir, teacher, _ = converted
    target = wdir / "cfp_vit_tiny_d2.safetensors"
    meta = read_metadata(target)
    assert (meta["modality"], meta["arch"], meta["source_format"], meta["num_heads"]) == \
        ("cfp", "vit_tiny_d2", "visionfm-official", 3)
    assert meta["mean"] == pytest.approx([0.424, 0.261, 0.128], abs=6e-4)
    index = read_index(wdir)
    assert index["cfp_vit_tiny_d2.safetensors"]["sha256"] == sha256_file(target)
    report = capsys.readouterr().out
    assert f"keys: {len(teacher.state_dict())} mapped, missing none, unexpected none" in report
    assert "DINO/iBOT projection head: 2" in report
    encoder, info = load_encoder("cfp", weights_dir=wdir)  # by modality alone, as downstream scripts do
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(encoder.forward_features(x), teacher.forward_features(x), rtol=0, atol=0)
    assert info.mean == pytest.approx((0.4237, 0.2609, 0.1284))


def test_list_shows_metadata(converted, capsys):
    wdir, _, _ = converted
    capsys.readouterr()
    assert main(["list", "--weights-dir", str(wdir)]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("cfp_vit_tiny_d2.safetensors"))
    sha = sha256_file(wdir / "cfp_vit_tiny_d2.safetensors")[:12]
    assert line.split()[:6] == ["cfp_vit_tiny_d2.safetensors", "cfp", "vit_tiny_d2", "16", str(IMG), "ep400"]
    assert line.endswith(sha)


def test_verify_detects_corruption_missing_and_unindexed_files(converted, capsys):
    wdir, _, src = converted
    target = wdir / "cfp_vit_tiny_d2.safetensors"
    assert main(["verify", "--weights-dir", str(wdir)]) == 0
    assert "ok   cfp_vit_tiny_d2.safetensors" in capsys.readouterr().out

    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    assert main(["verify", "--weights-dir", str(wdir)]) == 1
    assert "FAIL cfp_vit_tiny_d2.safetensors: sha256" in capsys.readouterr().out

    target.unlink()
    assert main(["verify", "--weights-dir", str(wdir)]) == 1
    assert "the file is missing" in capsys.readouterr().out

    assert main(["convert", str(src), "--modality", "cfp", "--weights-dir", str(wdir)]) == 0
    (wdir / "stray.safetensors").write_bytes(target.read_bytes())
    assert main(["verify", "--weights-dir", str(wdir)]) == 1
    assert "FAIL stray.safetensors: not in index.json" in capsys.readouterr().out


def test_empty_folder(tmp_path, capsys):
    assert main(["list", "--weights-dir", str(tmp_path)]) == 0
    assert "no weights in" in capsys.readouterr().out
    assert main(["verify", "--weights-dir", str(tmp_path)]) == 1


def test_convert_refuses_overwrite_and_wrong_modality(converted, capsys):
    wdir, _, src = converted
    before = sha256_file(wdir / "cfp_vit_tiny_d2.safetensors")
    assert main(["convert", str(src), "--modality", "cfp", "--weights-dir", str(wdir)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert sha256_file(wdir / "cfp_vit_tiny_d2.safetensors") == before
    assert main(["convert", str(src), "--modality", "OCT", "--weights-dir", str(wdir)]) == 2
    assert "trained on cfp images" in capsys.readouterr().err
    assert not (wdir / "oct_vit_tiny_d2.safetensors").exists()


def test_convert_output_path_and_float16(tmp_path):
    src = vfm_checkpoint(tmp_path / "VFM_OCT_weights.pth", small_vit(3), modality="OCT")
    out = tmp_path / "elsewhere" / "oct_small.safetensors"
    assert main(["convert", str(src), "--modality", "oct", "--output", str(out), "--dtype", "float16"]) == 0
    with safe_open(str(out), framework="pt") as fh:
        assert fh.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.float16
    index = json.loads((out.parent / "index.json").read_text())
    assert index["oct_small.safetensors"]["dtype"] == "float16"
    _, info = load_encoder("oct", weights_dir=out.parent)
    assert info.metadata["source_file"] == "VFM_OCT_weights.pth"


def test_malicious_checkpoint_is_refused_by_the_command(tmp_path):
    """Mirrors the acceptance check: through ``python -m visionfm.weights`` in a fresh process."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 192)}, "args": _RunsCode(str(marker))}, evil)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "visionfm.weights", "convert", str(evil), "--modality", "cfp",
                             "--weights-dir", str(tmp_path / "weights")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr
    assert "refused to load" in result.stderr and "--trust-pickle" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "weights").exists()
