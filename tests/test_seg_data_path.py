"""Segmentation's data path: crops cut per rank, augmentation on the training device (one batched call, the random
draws of the whole global batch), images decoded in DataLoader workers, and under torchrun each rank decoding only
its share of the training images into files that the ranks of a node map together."""

import numpy as np
import pytest
import torch
from PIL import Image

from _seg_tiny import TINY, write_tiny_encoder
from visionfm.engine.distributed import DistInfo
from visionfm.engine.loading import loader_settings
from visionfm.engine.loop import RunContext
from visionfm.tasks.segmentation import runner
from visionfm.tasks.segmentation.cli import main
from visionfm.tasks.segmentation.data import (CropSampler, SegAugmentation, SharedImages, decode_images,
                                              decode_loader, load_dataset)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    return write_tiny_encoder(tmp_path_factory.mktemp("weights") / "cfp_vit_tiny.safetensors")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A generic images/ + masks/ folder of 5 training and 2 test images (80 x 96) with random lines as truth."""
    root = tmp_path_factory.mktemp("data") / "lines"
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 2)):
        for i in range(n):
            image = rng.integers(0, 120, (80, 96, 3), dtype=np.uint8)
            truth = np.zeros((80, 96), bool)
            truth[int(rng.integers(5, 70)):][:3] = True
            truth[:, int(rng.integers(5, 90))] = True
            image[truth] = (220, 200, 120)
            for sub, arr in (("images", image), ("masks", truth.astype(np.uint8) * 255)):
                (root / split / sub).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / split / sub / f"{split}{i}.png")
    return root


def _crops(n=6, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
            torch.randint(0, 2, (n, 1, size, size), generator=g))


@pytest.mark.parametrize("kw", [{}, {"rotate_degrees": 30.0}, {"hue": 0.1, "colour_jitter": 0.3}])
def test_rank_parts_of_an_augmented_batch_are_the_one_process_batch(kw):
    """Two ranks, each augmenting its half with the draws of the whole batch, give the one-process batch exactly,
    and every rank's generator ends where one process's does (the next step draws the same on all ranks)."""
    images, labels = _crops()
    torch.manual_seed(5)
    x, y = SegAugmentation(**kw)(images, labels)
    after = torch.get_rng_state()
    parts = []
    for part in (slice(0, 3), slice(3, 6)):
        torch.manual_seed(5)
        parts.append(SegAugmentation(**kw)(images[part], labels[part], part=part, batch_size=6))
        assert torch.equal(torch.get_rng_state(), after)
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(x, images.float())  # it did augment
    with pytest.raises(ValueError, match="crops for part"):
        SegAugmentation(**kw)(images[:2], labels[:2], part=slice(0, 3), batch_size=6)


def test_crop_sampler_cuts_only_the_ranks_part_of_the_same_draws(dataset):
    splits = load_dataset(str(dataset), dataset)
    images = decode_images(splits.train, 3, {}, False)
    whole = CropSampler(images, 32, positive_fraction=0.5, seed=3)
    x, y = whole.sample(6)
    for part in (slice(0, 3), slice(3, 6)):
        sampler = CropSampler(images, 32, positive_fraction=0.5, seed=3)
        xp, yp = sampler.sample(6, part)
        assert torch.equal(xp, x[part]) and torch.equal(yp, y[part])
        assert sampler.rng.bit_generator.state == whole.rng.bit_generator.state


def _record_augmentation(monkeypatch):
    """Wrap SegAugmentation.__call__ to record where its crops are and where the model is."""
    calls = []
    real = SegAugmentation.__call__

    def recording(self, images, labels, part=None, batch_size=None):
        out = real(self, images, labels, part=part, batch_size=batch_size)
        calls.append((images.device, labels.device, out[0].device, images.shape[0], batch_size))
        return out

    monkeypatch.setattr(SegAugmentation, "__call__", recording)
    return calls


def _augmentation_runs_on(device, dataset, encoder_file, tmp_path, monkeypatch):
    calls = _record_augmentation(monkeypatch)
    seen = []
    real_build = runner.build_segmentor

    def build(*args, **kwargs):  # the model the run trains, to compare its device with the crops'
        model, mm_cfg = real_build(*args, **kwargs)
        seen.append(model)
        return model, mm_cfg

    monkeypatch.setattr(runner, "build_segmentor", build)
    assert main(["--dataset", str(dataset), "--weights", str(encoder_file), "--output", str(tmp_path / "o"),
                 "--max-steps", "2", "--device", device, "--finetune", *TINY]) == 0
    model_device = next(seen[0].parameters()).device
    assert model_device.type == torch.device(device).type
    assert len(calls) == 2  # one batched call per step, not one per crop
    for images_dev, labels_dev, out_dev, n, batch_size in calls:
        assert images_dev == labels_dev == out_dev == model_device
        assert n == 2 and batch_size == 2


def test_augmentation_runs_on_the_models_device_cpu(dataset, encoder_file, tmp_path, monkeypatch):
    _augmentation_runs_on("cpu", dataset, encoder_file, tmp_path, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_augmentation_runs_on_the_models_device_cuda(dataset, encoder_file, tmp_path, monkeypatch):
    _augmentation_runs_on("cuda", dataset, encoder_file, tmp_path, monkeypatch)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_augmentation_draws_what_the_cpu_draws():
    """The random draws stay on the CPU generator: the same seed augments the same on both devices."""
    images, labels = _crops()
    torch.manual_seed(5)
    x, y = SegAugmentation(hue=0.05)(images, labels)
    torch.manual_seed(5)
    xc, yc = SegAugmentation(hue=0.05)(images.cuda(), labels.cuda())
    assert xc.device.type == "cuda" and torch.equal(yc.cpu(), y)
    torch.testing.assert_close(xc.cpu(), x, atol=1e-3, rtol=1e-4)


def test_each_rank_decodes_only_its_share_and_maps_all(dataset, tmp_path, monkeypatch):
    """Under a simulated 2-rank RunContext each rank decodes (and writes) only its half of the training images,
    validation images only its own share, and the node's ranks then map all of them, read-only, from the one
    folder: equal to the images one process decodes in memory."""
    from visionfm.config import build_config
    from visionfm.tasks.segmentation.cli import DEFAULT_CONFIG

    cfg = build_config(DEFAULT_CONFIG, None, {"dataset": str(dataset)})
    splits = load_dataset(str(dataset), dataset)
    samples = splits.train
    decoded = []
    real = runner._load_all

    def counting(samples_, *args, **kwargs):
        decoded.append([s.name for s in samples_])
        return real(samples_, *args, **kwargs)

    monkeypatch.setattr(runner, "_load_all", counting)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    store = SharedImages(tmp_path / "shared")
    written = []
    for rank in (0, 1):
        ctx = RunContext(torch.device("cpu"), DistInfo(rank=rank, world_size=2, local_rank=rank))
        written.append(runner._decode_share(ctx, samples, cfg, False, store))
        assert decoded[-1] == [samples[i].name for i in written[-1]]
        assert ctx.shard(list(range(4))) == [[0, 1], [2, 3]][rank]  # validation: the rank's share (runner.train)
        if rank == 0:
            assert store.indices() == written[0]  # rank 0 wrote only its share
    assert written == [[0, 1], [2, 3, 4]]
    assert store.indices() == [0, 1, 2, 3, 4]
    shared = store.read(samples)
    reference = decode_images(samples, 3, cfg["data"], False)
    for a, b in zip(shared, reference):
        assert isinstance(a.image, np.memmap) and not a.image.flags.writeable
        assert a.sample == b.sample and a.original_size == b.original_size
        for what in ("image", "mask", "fov"):
            x, y = getattr(a, what), getattr(b, what)
            assert np.array_equal(x, y) and x.dtype == y.dtype
    # crops cut from the mapped images are those of the in-memory ones
    assert all(torch.equal(p, q) for p, q in zip(CropSampler(shared, 32, seed=1).sample(4),
                                                  CropSampler(reference, 32, seed=1).sample(4)))
    with pytest.raises(FileNotFoundError, match="a rank did not write its share"):
        SharedImages(tmp_path / "empty").read(samples)


def test_decoding_loader_keeps_its_workers_and_pins_on_a_gpu(dataset):
    splits = load_dataset(str(dataset), dataset)
    cpu = loader_settings({"num_workers": "auto"}, torch.device("cpu"))
    assert cpu["num_workers"] == 0 and not cpu["persistent_workers"] and not cpu["pin_memory"]
    gpu = loader_settings({"num_workers": 2}, torch.device("cuda"))
    assert gpu == {"num_workers": 2, "pin_memory": True, "persistent_workers": True, "prefetch_factor": 4}
    settings = loader_settings({"num_workers": 2}, torch.device("cpu"))
    loader = decode_loader(splits.train, 3, {}, False, settings)
    assert loader.num_workers == 2 and loader.persistent_workers
    torch.manual_seed(0)
    state = torch.get_rng_state()
    in_workers = list(loader)
    in_process = decode_images(splits.train, 3, {}, False)
    assert torch.equal(torch.get_rng_state(), state)  # decoding leaves the run's random stream alone
    assert [im.sample.name for im in in_workers] == [im.sample.name for im in in_process]
    assert all(np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
               for a, b in zip(in_workers, in_process))
