"""iBOT objective (lightly's patch loss, KoLeo and block masks arranged as the paper trains them) and the
resolution-aware crop settings of pretraining."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from scipy import ndimage

from conftest import ROOT, tiny_pretrain_config
from visionfm.data.unlabeled import UnlabeledImages, fit_and_resize
from visionfm.engine.checkpoint import safe_load
from visionfm.engine.dino_trainer import DINOTrainer
from visionfm.objectives.ibot import IBOTLoss, IBOTOutputs, MaskConfig, sample_masks
from visionfm.weights import load_encoder, read_metadata


def _ibot_config(**overrides):
    # 48-px global crops: a 3 x 3 patch grid, room for a masked block
    return tiny_pretrain_config(**{"objective": "ibot", "crops.global_size": 48, "data.load_size": 56, **overrides})


def test_patch_loss_equals_the_papers_formula():
    """Per image: mean over its masked patches of -sum_k softmax((t - c) / tau_t)_k log softmax(s / tau_s)_k; then
    the mean over images (an unmasked image adds 0), plus the class-token DINO term."""
    torch.manual_seed(0)
    n, grid, k = 4, (3, 3), 16
    masks = torch.zeros(n, *grid, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 1:, :] = True
    masks[3, 0, :] = True  # image 2 is not masked
    m = int(masks.sum())
    teacher_p, student_p = torch.randn(m, k), torch.randn(m, k)
    teacher_c, student_c = torch.randn(2, 2, k), torch.randn(4, 2, k)
    loss_fn = IBOTLoss(k, k, student_temp=0.1, center_momentum=0.9, cls_weight=1.0, patch_weight=0.5)
    loss_fn.patch_loss.center.center = torch.randn(1, k) * 0.1
    center = loss_fn.patch_loss.center.center.clone()
    total, terms = loss_fn(IBOTOutputs(teacher_c, teacher_p, torch.zeros(4, 8)),
                           IBOTOutputs(student_c, student_p, torch.zeros(4, 8)), masks, teacher_temp=0.04,
                           patch_teacher_temp=0.07)
    ce = -(F.softmax((teacher_p - center) / 0.07, -1) * F.log_softmax(student_p / 0.1, -1)).sum(-1)
    owner = torch.arange(n).repeat_interleave(masks.flatten(1).sum(1))
    per_image = torch.stack([ce[owner == i].mean() if (owner == i).any() else torch.tensor(0.0) for i in range(n)])
    expected_patch = per_image.mean()
    torch.testing.assert_close(terms["loss_patch"], expected_patch)
    torch.testing.assert_close(total, terms["loss_cls"] + 0.5 * expected_patch)
    # the patch centre moved towards the batch mean of the teacher's patch outputs
    torch.testing.assert_close(loss_fn.patch_loss.center.center, 0.9 * center + 0.1 * teacher_p.mean(0, keepdim=True))


def test_koleo_term_equals_its_formula():
    torch.manual_seed(1)
    loss_fn = IBOTLoss(8, 8, koleo_weight=0.1)
    cls_tokens = torch.randn(6, 5)  # two global views of three images
    out = IBOTOutputs(torch.randn(2, 3, 8), None, cls_tokens)
    _, terms = loss_fn(IBOTOutputs(torch.randn(2, 3, 8), None, cls_tokens), out, torch.zeros(6, 2, 2, dtype=torch.bool),
                       teacher_temp=0.04)

    def koleo(x):
        x = F.normalize(x, dim=-1)
        d = torch.cdist(x, x) + torch.eye(len(x)) * 10
        return -torch.log(d.min(dim=1).values + 1e-8).mean()

    expected = (koleo(cls_tokens[:3]) + koleo(cls_tokens[3:])) / 2
    torch.testing.assert_close(terms["loss_koleo"], expected, rtol=1e-4, atol=1e-5)


def test_block_masks_have_the_requested_share_ratio_and_block_shape():
    config = MaskConfig(probability=0.5, ratio=(0.1, 0.5), min_block=4)
    state = random.getstate()
    masks = sample_masks(16, (14, 14), config, seed=3)
    assert random.getstate() == state  # lightly's use of `random` leaves the caller's state alone
    assert torch.equal(masks, sample_masks(16, (14, 14), config, seed=3))  # a function of the seed
    per_image = masks.flatten(1).float().mean(1)
    assert int((per_image > 0).sum()) == 8  # exactly half of the images are masked
    masked = per_image[per_image > 0]
    assert masked.max() <= 0.5 + 1e-6 and masked.min() >= 0.1 - 4 / 196  # within the range (to a block's rounding)
    assert masked.std() > 0.02  # each image draws its own ratio
    for mask in masks[per_image > 0]:
        labels, count = ndimage.label(mask.numpy())
        sizes = ndimage.sum(mask.numpy(), labels, range(1, count + 1))
        # blocks, not scattered patches (lightly fills the last few patches of an image's quota with a smaller
        # block, so single patches occur, but most of the mask comes in blocks)
        assert sizes.mean() >= 4 and sizes.max() >= 6
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskConfig(ratio=(0.5, 1.2))


def test_ibot_run_records_objective_and_crops_and_exports_a_plain_encoder(tmp_path):
    out = tmp_path / "run"
    summary = DINOTrainer(_ibot_config(**{"train.max_steps": 3}), out).train()
    assert summary["global_step"] == 3 and np.isfinite(summary["final_loss"])
    ckpt = safe_load(out / "checkpoint.pt")
    assert "mask_token" in ckpt["student"] and any(k.startswith("patch_loss.center") for k in ckpt["dino_loss"])
    meta = read_metadata(out / "encoder.safetensors")
    assert meta["objective"] == "ibot" and meta["crops"]["cached_size"] == [56, 56]
    assert meta["crops"]["ibot"]["mask_ratio"] == [0.1, 0.5]
    encoder, info = load_encoder("oct", weights=out / "encoder.safetensors", img_size=48)  # strict key check inside
    assert info.metadata["objective"] == "ibot"
    assert "mask_token" not in load_file(out / "encoder.safetensors")


def test_ibot_steps_lower_the_loss_against_a_fixed_teacher():
    """With the teacher held still (momentum 1), repeated steps on one batch must lower iBOT's loss."""
    trainer = DINOTrainer(_ibot_config(**{"dino.momentum_teacher": 1.0, "optim.lr": 0.05, "optim.warmup_epochs": 0,
                                          "model.drop_path_rate": 0.0, "optim.epochs": 20}), "unused")
    trainer._build_data()
    trainer._build_model()
    torch.manual_seed(0)
    global_views, local_views = trainer.augment(torch.stack([trainer.dataset[i] for i in range(4)]))
    losses, patch_losses = [], []
    for _ in range(12):
        stats = trainer.train_step_views(global_views, local_views, 0, 5)  # step 0: the same masks every time
        losses.append(stats["loss"])
        patch_losses.append(stats["loss_patch"])
    assert losses[-1] < losses[0] - 0.05 and patch_losses[-1] < patch_losses[0]


def _cli(out, *extra):
    return [sys.executable, str(ROOT / "pretrain" / "dino.py"), "--modality", "oct", "--objective", "ibot",
            "--arch", "vit_tiny", "--img-size", "48", "--local-crops", "2", "--local-size", "16", "--batch-size", "4",
            "--epochs", "3", "--out-dim", "128", "--set", "head.hidden_dim=64", "--set", "head.bottleneck_dim=32",
            "--set", "data.synthetic_count=8", "--set", "data.load_size=56", "--set", "train.threads=1",
            "--device", "cpu", "--seed", "1", "--output", str(out), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--objective", "nonsense"], "--objective"),
    (["--set", "objective=mae"], "pretrain/mae.py"),
    (["--set", "ibot.mask_ratio=[0.2,1.5]"], "ibot.mask_ratio"),
    (["--set", "data.load_size=40"], "larger than the cached image"),
])
def test_bad_objective_mask_and_crop_settings_are_clear_errors(tmp_path, extra, message):
    out = tmp_path / "bad"
    result = subprocess.run(_cli(out, *extra), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (out / "encoder.safetensors").exists() and not (out / "config.yaml").exists()


def test_non_square_cache_keeps_the_aspect_of_b_scans(tmp_path):
    """OCT B-scans cached at [height, width] near their own aspect are not squashed into a square; fundus images
    are cut to the target aspect around their centre."""
    from PIL import Image

    scan = np.zeros((60, 150), np.uint8)
    scan[28:32] = 255  # one bright retinal layer across the whole width
    Image.fromarray(scan).save(tmp_path / "scan.png")
    data = UnlabeledImages([tmp_path / "scan.png"], "oct", [24, 60])
    image = data[0]
    assert image.shape == (1, 24, 60)
    assert image[0, 11:13].float().mean() > 150 and image[0, :8].float().mean() < 5  # the layer stays a thin line
    fundus = np.zeros((40, 80, 3), np.uint8)
    fundus[:, 20:60] = 200
    out = fit_and_resize(fundus, [20, 20], "center")  # the central 40 x 40 square
    assert out.shape == (20, 20, 3) and out.min() > 150


def test_pretraining_runs_on_non_square_cached_oct_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (57, 141), dtype=np.uint8)).save(tmp_path / f"b{i}.png")
    cfg = _ibot_config(**{"data.source": str(tmp_path), "data.load_size": "[50,120]", "train.max_steps": 1})
    trainer = DINOTrainer(cfg, tmp_path / "run")
    trainer.train()
    assert trainer.dataset[0].shape == (1, 50, 120)
    assert read_metadata(tmp_path / "run" / "encoder.safetensors")["crops"]["cached_size"] == [50, 120]
