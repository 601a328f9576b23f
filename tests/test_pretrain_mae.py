"""MAE pretraining on tiny models: the loss against the paper's formula, masks, learning, export through
load_encoder, and the CLI's refusal of a bad mask ratio. (Resume after SIGKILL at a random step:
tests/test_kill_resume.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT
from visionfm.engine.dino_trainer import export_only
from visionfm.engine.mae_trainer import MAETrainer
from visionfm.models.vit import create_encoder
from visionfm.objectives.mae import MAELoss, MAEModel, check_mask_ratio, masked_patch_count
from visionfm.weights import load_encoder, read_metadata

PATCH, SIZE = 8, 32  # a 4 x 4 patch grid


def tiny_mae_config(**overrides) -> dict:
    """The default MAE config shrunk to run a step in well under a second (vit_tiny on a 4 x 4 grid, a 1-block
    decoder)."""
    from visionfm.config import CONFIG_DIR, apply_overrides, load_yaml

    cfg = load_yaml(CONFIG_DIR / "pretrain" / "mae.yaml")
    base = {
        "modality": "oct", "data.synthetic_count": 8, "data.load_size": 40, "model.arch": "vit_tiny",
        "model.patch_size": PATCH, "crops.global_size": SIZE, "mae.decoder_dim": 32, "mae.decoder_depth": 1,
        "mae.decoder_num_heads": 4, "optim.epochs": 2, "optim.batch_size": 4, "optim.warmup_epochs": 1,
        "train.device": "cpu", "train.threads": 1,  # runs compared bit for bit must not time their own thread counts
    }
    base.update(overrides)
    return apply_overrides(cfg, [f"{k}={v}" for k, v in base.items()])


def tiny_model(decoder_dim: int = 32) -> MAEModel:
    torch.manual_seed(0)
    return MAEModel(create_encoder("vit_tiny", PATCH, SIZE), decoder_dim=decoder_dim, decoder_depth=1,
                    decoder_num_heads=4)


def paper_loss(images: torch.Tensor, pred_all: torch.Tensor, removed: torch.Tensor, p: int,
               norm_pix: bool = True) -> torch.Tensor:
    """The MAE paper's loss written out on its own: images cut into p x p patches in (row, column) order, each
    patch flattened as (y, x, channel); with norm_pix each target patch standardised by its mean and (unbiased)
    variance + 1e-6; the squared error averaged over each patch's pixels, then over the removed patches only
    (``removed``: 1 where a patch was masked, over all L patches)."""
    n, c, h, w = images.shape
    grid = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # n, rows, cols, y, x, c
    target = grid.reshape(n, (h // p) * (w // p), p * p * c)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred_all - target) ** 2).mean(dim=-1)
    return (per_patch * removed).sum() / removed.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_normalised_pixel_loss_equals_the_paper_formula(norm_pix):
    model = tiny_model().eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    torch.manual_seed(1)
    idx_keep, idx_mask = model.random_mask(3, 0.75)
    with torch.no_grad():
        predictions = model(images, idx_keep, idx_mask)
        loss = MAELoss(norm_pix_loss=norm_pix)(predictions, model.patch_targets(images, idx_mask))
    # The same predictions laid out over all L patches, zeros where a patch was kept (the mask excludes them).
    patches = idx_mask - 1
    pred_all = torch.zeros(3, 16, PATCH * PATCH * 3).scatter(1, patches[..., None].expand(-1, -1, PATCH * PATCH * 3),
                                                              predictions)
    removed = torch.zeros(3, 16).scatter(1, patches, 1.0)
    expected = paper_loss(images, pred_all, removed, PATCH, norm_pix)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # the normalisation matters: the two variants differ on the same tensors
    other = paper_loss(images, pred_all, removed, PATCH, not norm_pix)
    assert not torch.isclose(loss, other, rtol=1e-3)


@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.3, 0.9])
def test_mask_hides_the_requested_share_of_patches(ratio):
    model = tiny_model()
    torch.manual_seed(2)
    idx_keep, idx_mask = model.random_mask(6, ratio)
    masked = masked_patch_count(16, ratio)
    assert masked == 16 - int(16 * (1 - ratio)) and abs(masked / 16 - ratio) < 1 / 16
    assert idx_mask.shape == (6, masked) and idx_keep.shape == (6, 17 - masked)
    for keep, hide in zip(idx_keep.tolist(), idx_mask.tolist()):
        assert sorted(keep + hide) == list(range(17))  # each token is kept or masked, once
        assert keep[0] == 0 and 0 not in hide  # the class token is never masked
    assert len({tuple(sorted(row)) for row in idx_mask.tolist()}) > 1  # a mask per image
    with torch.no_grad():
        out = model(torch.randn(6, 3, SIZE, SIZE), idx_keep, idx_mask)
    assert out.shape == (6, masked, PATCH * PATCH * 3)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, float("nan"), "many"])
def test_mask_ratio_outside_zero_one_is_refused(bad):
    with pytest.raises(ValueError, match="mask ratio"):
        check_mask_ratio(bad)


def test_a_few_steps_lower_the_reconstruction_loss(tmp_path):
    """30 steps on eight grey ramps (left/right/up/down): the held-out loss falls far below the ~1.0 of predicting
    the mean, which only a decoder that reads the encoder's visible patches can reach (the masked patches' ramp
    direction is that of the visible ones)."""
    ramp = np.linspace(0, 255, 40)
    for i in range(8):
        image = np.tile(ramp if i % 2 else ramp[::-1], (40, 1))
        Image.fromarray((image.T if (i // 2) % 2 else image).astype(np.uint8)).save(tmp_path / f"ramp_{i}.png")
    cfg = tiny_mae_config(**{"data.source": str(tmp_path), "optim.batch_size": 8, "optim.epochs": 30,
                             "optim.lr": 0.05, "optim.min_lr": 1.5e-3, "optim.warmup_epochs": 0,
                             "mae.decoder_dim": 64, "train.precision": "fp32"})
    trainer = MAETrainer(cfg, tmp_path / "run")
    trainer._build_data()
    images = torch.stack([trainer.dataset[i] for i in range(len(trainer.dataset))])

    def held_out_losses() -> tuple:
        """The loss on fixed views and masks of the eight images (the same for every call), and the loss of
        predicting zeros (each normalised target patch's mean) there."""
        torch.manual_seed(123)
        views = trainer.augment(images)
        idx_keep, idx_mask = trainer.model.random_mask(len(views), trainer.mask_ratio)
        trainer.model.eval()
        with torch.no_grad():
            predictions = trainer.model(views, idx_keep, idx_mask)
            targets = trainer.model.patch_targets(views, idx_mask)
            return trainer.loss_fn(predictions, targets).item(), trainer.loss_fn(predictions * 0, targets).item()

    trainer._build_model()
    before, mean_only = held_out_losses()
    summary = trainer.train()  # rebuilds the same initial model (seeded), then 30 steps
    after, _ = held_out_losses()
    assert summary["global_step"] == 30
    assert 0.9 < mean_only < 1.0 and before > mean_only
    assert after < 0.6 * mean_only, (before, after, mean_only)


def _cli(out: Path, *extra: str) -> list:
    return [sys.executable, str(ROOT / "pretrain" / "mae.py"), "--modality", "oct", "--arch", "vit_tiny",
            "--patch-size", str(PATCH), "--img-size", str(SIZE), "--batch-size", "4", "--epochs", "4",
            "--lr", "0.05", "--set", "data.synthetic_count=16", "--set", "data.load_size=40",
            "--set", "mae.decoder_dim=32", "--set", "mae.decoder_depth=1", "--set", "mae.decoder_num_heads=4",
            "--set", "optim.warmup_epochs=2",
            "--set", "train.threads=1", "--set", "train.checkpoint_every_steps=3", "--device", "cpu", "--seed", "1",
            "--output", str(out), *extra]


def test_export_is_the_encoder_alone_and_loads_strictly(tmp_path):
    wdir, out = tmp_path / "weights", tmp_path / "run"
    trainer = MAETrainer(tiny_mae_config(**{"export.to": str(wdir), "train.max_steps": 2}), out)
    trainer.train()
    exported = load_file(out / "encoder.safetensors")
    fresh = create_encoder("vit_tiny", PATCH, SIZE).state_dict()
    assert set(exported) == set(fresh)  # the keys of a DINO export: no decoder, no mask token
    assert all(torch.equal(exported[k], v.cpu()) for k, v in trainer.model.encoder.state_dict().items())
    meta = read_metadata(out / "encoder.safetensors")
    assert meta["objective"] == "mae" and meta["mask_ratio"] == 0.75 and meta["steps"] == 2
    assert meta["modality"] == "oct" and meta["patch_size"] == PATCH and meta["img_size"] == SIZE

    encoder, info = load_encoder("oct", weights=out / "encoder.safetensors")
    assert info.key_report.missing == [] and info.key_report.unexpected == [] and info.key_report.mapped == len(fresh)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        # (the trainer's encoder computes attention as two matmuls on the CPU, the loaded one fused: float rounding)
        torch.testing.assert_close(encoder.eval()(x), trainer.model.encoder.eval()(x), rtol=1e-4, atol=1e-5)
    first = (out / "encoder.safetensors").read_bytes()
    (out / "encoder.safetensors").unlink()
    export_only(tiny_mae_config(**{"train.max_steps": 2}), out, trainer_cls=MAETrainer)  # --export
    assert (out / "encoder.safetensors").read_bytes() == first

    fp16, info16 = load_encoder("OCT", weights_dir=wdir)  # found through index.json
    assert info16.source == str(wdir / "oct_vit_tiny.safetensors") and info16.metadata["objective"] == "mae"
    with torch.no_grad():
        torch.testing.assert_close(fp16.eval()(x), encoder(x), rtol=2e-2, atol=2e-2)  # fp16 storage


def test_cli_refuses_a_mask_ratio_outside_zero_one_before_writing_anything(tmp_path):
    out = tmp_path / "bad"
    result = subprocess.run(_cli(out, "--mask-ratio", "1.5"), capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "--mask-ratio" in result.stderr and "mask ratio" in result.stderr and "1.5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing trained, exported or even created

    from visionfm.pretrain_mae_cli import mae_main

    argv = _cli(out)[2:]
    assert mae_main([*argv, "--set", "mae.mask_ratio=0"]) == 2
    assert mae_main([*argv, "--mask-ratio", "1"]) == 2
    assert not out.exists()


def test_cli_help_explains_the_mae_flags():
    result = subprocess.run([sys.executable, str(ROOT / "pretrain" / "mae.py"), "--help"], capture_output=True,
                            text=True, check=True)
    for flag in ("--mask-ratio", "--data", "--export-to", "--export", "--img-size", "--max-steps", "--set"):
        assert flag in result.stdout
    assert "strictly between 0 and 1" in " ".join(result.stdout.split())


def test_init_from_continues_an_exported_encoder_at_a_larger_size(tmp_path):
    """model.init_from (--init-from): a fresh run starts from an exported encoder, its position embedding resized
    to the new crop size; the export records the starting file; a resumed run keeps that record and does not
    re-initialise."""
    first = tmp_path / "first"
    MAETrainer(tiny_mae_config(**{"train.max_steps": 2}), first).train()
    source = first / "encoder.safetensors"
    start, _ = load_encoder("oct", weights=source, img_size=2 * SIZE)  # what the continued run must start from

    second = tmp_path / "second"
    cfg = tiny_mae_config(**{"train.max_steps": 1, "optim.lr": 0.0, "optim.min_lr": 0.0,
                             "crops.global_size": 2 * SIZE, "data.load_size": 72, "model.init_from": str(source)})
    trainer = MAETrainer(cfg, second)
    trainer.train()  # one step at a zero learning rate: the export is the starting point itself
    state = trainer.model.encoder.state_dict()
    assert state["pos_embed"].shape[1] == 1 + (2 * SIZE // PATCH) ** 2
    assert all(torch.equal(state[k], v) for k, v in start.state_dict().items())
    meta = read_metadata(second / "encoder.safetensors")
    record = meta["init_from"]
    assert record["path"] == str(source) and record["steps"] == 2 and record["img_size"] == SIZE
    assert record["sha256"] == __import__("hashlib").sha256(source.read_bytes()).hexdigest()
    assert "continued from encoder.safetensors" in meta["data"] and meta["img_size"] == 2 * SIZE

    # A resumed run keeps the record (from its checkpoint) and its trained weights, even with the file gone.
    cfg = tiny_mae_config(**{"train.max_steps": 2, "crops.global_size": 2 * SIZE, "data.load_size": 72,
                             "model.init_from": str(source)})
    MAETrainer(cfg, tmp_path / "third").train()
    trained = load_file(tmp_path / "third" / "encoder.safetensors")
    source.rename(tmp_path / "moved.safetensors")
    cfg["train"]["max_steps"] = 3
    resumed = MAETrainer(cfg, tmp_path / "third")
    resumed.train()
    assert read_metadata(tmp_path / "third" / "encoder.safetensors")["init_from"]["path"] == str(source)
    assert read_metadata(tmp_path / "third" / "encoder.safetensors")["steps"] == 3
    assert not torch.equal(resumed.model.encoder.state_dict()["blocks.0.attn.qkv.weight"],
                           trained["blocks.0.attn.qkv.weight"])  # it trained on from step 2


def test_init_from_refuses_another_architecture_naming_the_file(tmp_path):
    wrong = tmp_path / "small.safetensors"
    from visionfm.weights.export import save_encoder

    save_encoder(create_encoder("vit_small", PATCH, SIZE).state_dict(), wrong,
                 {"format": "visionfm-encoder/1", "modality": "oct", "arch": "vit_small", "patch_size": PATCH,
                  "img_size": SIZE})
    trainer = MAETrainer(tiny_mae_config(**{"model.init_from": str(wrong)}), tmp_path / "run")
    with pytest.raises(Exception, match="small.safetensors"):
        trainer.train()
    with pytest.raises(FileNotFoundError, match="no encoder file"):
        MAETrainer(tiny_mae_config(**{"model.init_from": str(tmp_path / "absent.safetensors")}),
                   tmp_path / "run2").train()


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs" / "pretrain").glob("*_vit_*.yaml")))
def test_shipped_mae_recipes_pass_the_checks_and_each_stage_starts_from_the_one_before(recipe):
    """Every encoder recipe in configs/pretrain merges over mae.yaml and passes the checks run before training.
    Stage 1 is ``<modality>_<arch>.yaml`` (``oct_vit_tiny.yaml``, ``oct_vit_small.yaml``) and starts from
    scratch; a later stage adds a suffix (``_224``, ``_long``, ``_224_long``) and starts from the output folder of
    the recipe without its last suffix; a ``_from_<modality>`` recipe starts from that modality's shipped encoder in
    weights/ (cross-modality start)."""
    from visionfm.config import CONFIG_DIR, build_config
    from visionfm.engine.mae_trainer import check_mae_config

    cfg = build_config(CONFIG_DIR / "pretrain" / "mae.yaml", CONFIG_DIR / "pretrain" / recipe, {}, [])
    assert check_mae_config(cfg) == 0.75
    name = recipe[:-len(".yaml")]
    arch = cfg["model"]["arch"]
    assert f"_{arch}" in name, f"{recipe}: the file name does not name its model.arch {arch}"
    stages = name.partition(f"_{arch}")[2]
    if stages.startswith("_from_"):
        source = f"weights/{stages[len('_from_'):]}_{arch}.safetensors"
        assert cfg["model"]["init_from"] == source
        assert (ROOT / source).is_file()
    elif stages:
        previous = name.rsplit("_", 1)[0]
        assert cfg["model"]["init_from"] == f"runs/{previous}/encoder.safetensors"
    else:
        assert cfg["model"]["init_from"] is None
    if "_224" in stages:
        assert cfg["crops"]["global_size"] == 224
