"""benchmarks/gpu_check.sh --cpu: the prepared GPU readiness check runs end to end at tiny sizes and its summary
says what passed (the GPU run itself needs a lent GPU machine; benchmarks/README.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_check_cpu_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--cpu"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    checks = summary["checks"]
    assert summary["mode"] == "cpu" and summary["failed"] == []
    for objective in ("dino", "ibot"):  # on the CPU a resumed run repeats the uninterrupted one bit for bit
        assert checks[f"{objective}_exact_resume"]["bit_identical"] is True
        assert checks[f"{objective}_exact_resume"]["steps"] == 8
    rows = checks["pretrain_step_vs_reference"]["rows"]
    assert [r["arch"] for r in rows] == ["vit_tiny"] and rows[0]["ratio"] > 0
    assert 0.0 <= checks["data_wait_jpeg_workers"]["data_wait_fraction"] <= 1.0
    steps = dict(line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines())
    assert all(rc == "0" for rc in steps.values()), steps
    assert summary["versions"]["mm_modules_imported"] == []


def test_compare_reports_differences(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([0.0, 0.5, 0.0])}, str(tmp_path / "b.safetensors"))
    assert gpu_check.main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                           "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["bit_identical"] is False and result["max_abs_diff"] == 0.5 and result["worst"] == "w"


def test_summary_fails_a_missing_resume_and_a_broken_focal_kernel(tmp_path):
    (tmp_path / "ops.json").write_text(json.dumps({
        "ops": {"nms": {"ok": True}, "sigmoid_focal_loss_fp16": {"ok": True}, "sigmoid_focal_loss_bf16": {"ok": False}},
        "retinanet_precision_auto": {"dtype": "torch.float16", "kernel_ok": True}}))
    assert gpu_check.main(["summary", "--out", str(tmp_path), "--mode", "gpu"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    # bf16 failing in mmcv's kernel is expected; what matters is that auto avoids it
    assert summary["checks"]["mmcv_cuda_ops"]["ok"] is True
    assert summary["checks"]["focal_loss_bf16_is_avoided"]["ok"] is True
    assert {"dino_exact_resume", "ibot_exact_resume", "pretrain_step_vs_reference"} <= set(summary["failed"])
