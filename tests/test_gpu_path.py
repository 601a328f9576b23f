"""The GPU path, checked on the CPU where its logic allows (issue #22): dtypes per op and per GPU generation, the
device of each torchrun rank, resuming under another world size, stop requests and checkpoints agreed across two
gloo ranks, no host synchronisation in a step that is not logged, loader defaults by device, the named-source CSV
written atomically, and the torch floor in setup.cfg."""

from __future__ import annotations

import configparser
import os
import re
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_pretrain_config
from visionfm.engine import precision as precision_module
from visionfm.engine.precision import enable_tf32, precision_for_ops, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


@pytest.fixture
def gpu_generation(monkeypatch):
    """Stand in for a GPU of a given compute capability: ``gpu_generation((7, 0))``."""
    def set_capability(capability):
        monkeypatch.setattr(precision_module, "cuda_capability", lambda device: capability)
    return set_capability


# ------------------------------------------------------------------------------------------- 1, 8: dtypes
def test_auto_precision_is_bf16_from_ampere_and_fp16_with_a_scaler_before(gpu_generation):
    gpu_generation((9, 0))  # H100/H200
    assert resolve_precision("auto", CUDA) == (torch.bfloat16, False)
    gpu_generation((8, 0))  # A100
    assert resolve_precision("auto", CUDA) == (torch.bfloat16, False)
    gpu_generation((7, 0))  # V100: torch.cuda.is_bf16_supported() says True there (emulated), auto must not use it
    assert resolve_precision("auto", CUDA) == (torch.float16, True)
    gpu_generation((7, 5))  # T4
    assert resolve_precision("auto", CUDA) == (torch.float16, True)
    assert resolve_precision("bf16", CUDA) == (torch.bfloat16, False)  # asked for explicitly: honoured
    assert resolve_precision("fp32", CUDA) == (None, False)


def test_focal_loss_heads_leave_bf16_on_a_gpu_but_not_on_the_cpu(gpu_generation):
    gpu_generation((9, 0))
    dtype, scaler, why = precision_for_ops("auto", CUDA, ["sigmoid_focal_loss"])
    assert (dtype, scaler) == (torch.float16, True) and "sigmoid_focal_loss" in why and "fp16" in why
    with pytest.raises(ValueError, match="does not take bfloat16"):
        precision_for_ops("bf16", CUDA, ["sigmoid_focal_loss"])
    assert precision_for_ops("fp16", CUDA, ["sigmoid_focal_loss"]) == (torch.float16, True, None)
    assert precision_for_ops("fp32", CUDA, ["sigmoid_focal_loss"]) == (None, False, None)
    assert precision_for_ops("auto", CUDA, []) == (torch.bfloat16, False, None)
    # On the CPU mmdet's focal loss is plain PyTorch: bf16 stays.
    assert precision_for_ops("bf16", torch.device("cpu"), ["sigmoid_focal_loss"]) == (torch.bfloat16, False, None)


@pytest.mark.parametrize("detector,ops", [("retinanet", ["sigmoid_focal_loss"]), ("fcos", ["sigmoid_focal_loss"]),
                                          ("faster_rcnn", [])])
def test_detectors_name_the_dtype_limited_cuda_ops_they_call(detector, ops):
    pytest.importorskip("mmdet")
    from test_det_model import tiny_config

    from visionfm.tasks.detection.runner import build_detector, compiled_cuda_ops

    model, _, _ = build_detector(tiny_config(detector), ("disc",), img_size=64)
    assert compiled_cuda_ops(model) == ops


def test_tf32_only_on_ampere_or_newer_gpus(gpu_generation):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert enable_tf32(torch.device("cpu")) is False
        gpu_generation((7, 0))
        assert enable_tf32(CUDA) is False and torch.get_float32_matmul_precision() == "highest"
        gpu_generation((9, 0))
        assert enable_tf32(CUDA) is True and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------------------------- 3: device index
@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(four_gpus):
    from visionfm.cli import resolve_device

    assert resolve_device(None) == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    four_gpus.setenv("LOCAL_RANK", "2")
    four_gpus.setenv("WORLD_SIZE", "4")
    assert resolve_device(None) == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:2") == torch.device("cuda", 2)
    with pytest.raises(SystemExit, match="LOCAL_RANK 2 and takes cuda:2"):
        resolve_device("cuda:0")  # every rank on GPU 0
    four_gpus.setenv("LOCAL_RANK", "5")
    with pytest.raises(SystemExit, match="GPU 5 does not exist"):
        resolve_device("cuda")


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    from visionfm.cli import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(SystemExit, match="CUDA is not available"):
        resolve_device("cuda")


# ------------------------------------------------------------------------------------------- 4: torch floor
def test_setup_cfg_torch_floor_has_the_apis_the_step_uses():
    """The DINO step calls get_total_norm and clip_grads_with_norm_ (new in torch 2.6); the floor must not be lower
    than the version that brought them, and the installed torch must have them."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requirement = next(r for r in cfg["options"]["install_requires"].split("\n") if r.strip().startswith("torch>="))
    floor = tuple(int(x) for x in re.match(r"torch>=(\d+)\.(\d+)", requirement.strip()).groups())
    assert floor >= (2, 6)
    step_source = (ROOT / "visionfm" / "engine" / "dino_trainer.py").read_text()
    for api in ("get_total_norm", "clip_grads_with_norm_"):
        assert f"torch.nn.utils.{api}" in step_source  # still used: otherwise the floor's reason is gone
        assert callable(getattr(torch.nn.utils, api))


# ------------------------------------------------------------------------------------------- 5: world size
def test_world_size_check_allows_the_same_global_batch_only(tmp_path):
    from visionfm.engine.dino_trainer import check_world_size

    ckpt = {"world_size": 2, "global_batch": 64}
    assert check_world_size(ckpt, 2, 64, tmp_path) is None
    assert check_world_size({}, 4, 128, tmp_path) is None  # written before the world size was recorded
    note = check_world_size(ckpt, 4, 64, tmp_path)
    assert "4 process(es)" in note and "same global batch 64" in note
    with pytest.raises(ValueError, match=r"--batch-size 16 keeps it with 4") as err:
        check_world_size(ckpt, 4, 128, tmp_path)
    assert "global batch 64" in str(err.value) and "global batch 128" in str(err.value)


def test_resume_under_another_world_size_is_refused(tmp_path):
    """A real run's checkpoint records its world size and global batch; a trainer with two processes at another
    global batch refuses it, one at the same global batch resumes it."""
    from visionfm.engine.dino_trainer import DINOTrainer
    from visionfm.engine.distributed import DistInfo

    out = tmp_path / "run"
    summary = DINOTrainer(tiny_pretrain_config(**{"train.max_steps": 1}), out).train()
    assert summary["global_step"] == 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (ckpt["world_size"], ckpt["global_batch"]) == (1, 4)

    trainer = DINOTrainer(tiny_pretrain_config(), out)
    trainer.dist = DistInfo(rank=0, world_size=2, local_rank=0)  # what torchrun --nproc-per-node 2 would give
    trainer.global_batch = 8
    with pytest.raises(ValueError, match="written by 1 process"):
        trainer._load_checkpoint()
    trainer.global_batch = 4  # --batch-size 2 on each of the two
    assert trainer._load_checkpoint()["global_step"] == 1


# ------------------------------------------------------------------------------------------- 6, 7: two gloo ranks
def _gloo_worker(rank: int, init_file: str, folders: list, results: str) -> None:
    from visionfm.engine.distributed import any_rank, load_on_every_rank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        # 7: SIGTERM reaches rank 1 only, in the middle of its step; the wall-clock budget runs out on rank 0 only.
        received = []
        old = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
        try:
            if rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            stop, out_of_time = any_rank(bool(received), rank == 0)
            nothing = any_rank(False, False)
        finally:
            signal.signal(signal.SIGTERM, old)
        # 6: the checkpoint is on rank 0's disk only (no shared file system); then on both disks.
        only_rank0 = load_on_every_rank(Path(folders[rank]) / "ckpt.pt", lambda p: torch.load(p, weights_only=True))
        Path(folders[1], "ckpt.pt").write_bytes(Path(folders[0], "ckpt.pt").read_bytes()) if rank == 1 else None
        dist.barrier()
        both = load_on_every_rank(Path(folders[rank]) / "ckpt.pt", lambda p: torch.load(p, weights_only=True))
        missing = load_on_every_rank(Path(folders[rank]) / "none.pt", lambda p: torch.load(p, weights_only=True))
        torch.save({"stop": stop, "out_of_time": out_of_time, "nothing": nothing, "only_rank0": only_rank0,
                    "both": both, "missing": missing}, Path(results) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_stop_requests_and_checkpoints_are_agreed_by_two_gloo_ranks(tmp_path):
    folders = [tmp_path / "node0", tmp_path / "node1"]
    for f in folders:
        f.mkdir()
    torch.save({"global_step": 7, "weight": torch.arange(3.0)}, folders[0] / "ckpt.pt")
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), [str(f) for f in folders], str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["stop"] is True and got["out_of_time"] is True, rank  # each flag raised on one rank only
        assert got["nothing"] == (False, False)
        assert got["only_rank0"]["global_step"] == 7 and torch.equal(got["only_rank0"]["weight"], torch.arange(3.0))
        assert got["both"]["global_step"] == 7 and got["missing"] is None


# ------------------------------------------------------------------------------------------- 10: host syncs
@pytest.fixture
def host_reads(monkeypatch):
    """Counts reads of tensor values on the host (``item``, ``bool``, ``float``, ``int``, ``tolist``): each is a
    synchronisation on a GPU. Yields the list of (method, caller file) pairs."""
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, sys._getframe(1).f_code.co_filename))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("objective", ["dino", "ibot", "mae"])
def test_a_step_that_is_not_logged_reads_nothing_on_the_host(tmp_path, host_reads, objective):
    from visionfm.engine.dino_trainer import DINOTrainer
    from visionfm.engine.mae_trainer import MAETrainer

    if objective == "mae":
        from test_pretrain_mae import tiny_mae_config as make_config

        cfg, cls = make_config(**{"train.log_every": 3}), MAETrainer
    else:
        cfg, cls = tiny_pretrain_config(**{"train.log_every": 3, "objective": objective}), DINOTrainer
    trainer = cls(cfg, tmp_path)
    trainer._build_data()
    trainer._build_model()
    trainer._set_train_mode()
    images = next(iter(trainer.loader))
    if objective == "mae":
        run = lambda step: trainer.train_step(images, step, 0)  # noqa: E731
    else:  # the step itself; the augmentation (kornia) runs on its own CUDA stream (DINOTrainer.on_side_stream)
        views = trainer.augment(images)
        run = lambda step: trainer.train_step_views(*views, step, 0)  # noqa: E731
    host_reads.clear()
    stats = run(1)
    # iBOT's block masks are drawn on the CPU by lightly before they travel to the GPU: host values by design.
    ours = [(name, path) for name, path in host_reads if "lightly" not in path and "kornia" not in path]
    assert ours == [], ours
    assert isinstance(stats["loss"], torch.Tensor)
    logged = run(3)  # a logging step reads its values (and checks the loss is finite)
    assert isinstance(logged["loss"], float) and host_reads


def test_the_pretraining_loop_reads_nothing_on_the_host_between_logging_steps(tmp_path, host_reads):
    """Around the steps, TrainLoop(lazy=True) reads device values only at the steps it must (the trainer's
    logging steps, saves, the end): a run of 8 steps makes as many reads in loop.py as a run of 3."""
    from visionfm.engine.dino_trainer import DINOTrainer

    counts = []
    for steps in (3, 8):
        host_reads.clear()
        DINOTrainer(tiny_pretrain_config(**{"train.log_every": 100, "train.checkpoint_every_steps": 0,
                                            "optim.epochs": 4, "train.max_steps": steps}), tmp_path / str(steps)).train()
        counts.append(sum(path.endswith("loop.py") for _, path in host_reads))
    assert counts[0] == counts[1] and counts[0] > 0, counts


def test_a_nan_loss_between_logging_steps_is_caught_before_the_checkpoint(tmp_path):
    """The pretraining loop (TrainLoop lazy=True) keeps the losses of steps that are not logged on the device and
    checks them before a checkpoint: a NaN at step 2 of 3 stops the run before the save after step 3."""
    from visionfm.engine.loop import RunContext, TrainLoop
    from visionfm.errors import NonFiniteLossError

    losses = [torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(2.0)]
    saved = []
    loop = TrainLoop(RunContext(torch.device("cpu")), total=3, desc="dino pretraining", save_every=3, lazy=True)
    with pytest.raises(NonFiniteLossError, match="between steps 1 and 3"):
        loop.run(lambda i: {"loss": losses[i]}, None, saved.append)
    assert saved == []


# ------------------------------------------------------------------------------------------- 11: loader defaults
def test_loader_defaults_by_device(monkeypatch):
    from visionfm.engine.loading import loader_settings

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_settings({"num_workers": "auto"}, torch.device("cpu")) == {
        "num_workers": 0, "pin_memory": False, "persistent_workers": False}
    gpu = loader_settings({"num_workers": "auto"}, CUDA)
    assert gpu == {"num_workers": 8, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # eight ranks share the node's 32 CPUs
    assert loader_settings({"num_workers": "auto"}, CUDA)["num_workers"] == 3
    assert loader_settings({"num_workers": 0}, CUDA)["persistent_workers"] is False
    with pytest.raises(ValueError, match="num_workers"):
        loader_settings({"num_workers": -1}, CUDA)


# ------------------------------------------------------------------------------------------- 9: source CSV
def test_named_source_csv_is_replaced_atomically_and_left_alone_when_unchanged(tmp_path):
    from visionfm.data.sources import write_source_csv

    files = [tmp_path / "a.png", tmp_path / "b.png"]
    target = tmp_path / "run" / "pretrain_images.csv"
    write_source_csv(files, target)
    assert target.read_text().splitlines() == ["path", str(files[0].resolve()), str(files[1].resolve())]
    inode = target.stat().st_ino
    write_source_csv(files, target)  # what every other rank does: the same list, nothing rewritten
    assert target.stat().st_ino == inode
    write_source_csv(files[:1], target)  # another list: a new file renamed over the old one
    assert target.stat().st_ino != inode and target.read_text().splitlines()[1:] == [str(files[0].resolve())]
    assert sorted(p.name for p in target.parent.iterdir()) == ["pretrain_images.csv"]  # no temporary files left


# ------------------------------------------------------------------------------------------- on a GPU (-m cuda)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_that_is_not_logged_never_synchronises(tmp_path):
    """torch's sync debug mode turns any host synchronisation inside the step into an error. (kornia's own waits
    in the augmentation are left to its side stream, DINOTrainer.on_side_stream.)"""
    from visionfm.engine.dino_trainer import DINOTrainer

    trainer = DINOTrainer(tiny_pretrain_config(**{"train.log_every": 3, "train.device": "cuda"}), tmp_path)
    trainer._build_data()
    trainer._build_model()
    trainer._set_train_mode()
    images = next(iter(trainer.loader)).pin_memory()
    trainer.train_step(images, 1, 0)  # warm-up (cuBLAS handles, allocator)
    views = trainer.on_side_stream(lambda: trainer.augment(images.to(trainer.device, non_blocking=True)))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats = trainer.train_step_views(*views, 2, 0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(stats["loss"], torch.Tensor) and stats["loss"].is_cuda
    assert isinstance(trainer.train_step(images, 3, 0)["loss"], float)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_retinanet_trains_a_step_in_the_precision_auto_picks(tmp_path):
    """mmcv's CUDA sigmoid_focal_loss under the autocast dtype precision_for_ops picks (bf16 would fail)."""
    pytest.importorskip("mmdet")
    from mmengine.dataset import pseudo_collate
    from test_det_model import _records, tiny_config

    from visionfm.tasks.detection.dataset import DetectionDataset
    from visionfm.tasks.detection.runner import build_detector, compiled_cuda_ops

    device = torch.device("cuda", 0)
    model, _, _ = build_detector(tiny_config("retinanet"), ("disc",), img_size=64)
    model.to(device).train()
    dtype, needs_scaler, _ = precision_for_ops("auto", device, compiled_cuda_ops(model))
    assert dtype != torch.bfloat16
    dataset = DetectionDataset(_records(tmp_path), ("disc",), 3, 64, train=True)
    data = model.data_preprocessor(pseudo_collate([dataset[0], dataset[1]]), training=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        losses = model(**data, mode="loss")
    loss, _ = model.parse_losses(losses)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    (scaler.scale(loss) if scaler else loss).backward()
    assert torch.isfinite(loss).item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_precision_and_tf32_on_this_gpu():
    device = torch.device("cuda", 0)
    major, _ = torch.cuda.get_device_capability(device)
    dtype, scaler = resolve_precision("auto", device)
    assert (dtype, scaler) == ((torch.bfloat16, False) if major >= 8 else (torch.float16, True))
