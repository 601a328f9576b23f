"""One decoded copy of a pretraining dataset per machine (``SharedCache``): the same images as the in-process
cache, reused on a rerun, decoded anew when a file changes, and a clear error when the file is not there."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from visionfm.data.unlabeled import DataError, SharedCache, UnlabeledImages


@pytest.fixture()
def images(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i, (w, h) in enumerate([(40, 40), (48, 32), (36, 44)]):
        path = tmp_path / "imgs" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        files.append(path)
    return files


class Barrier:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_shared_cache_matches_memory_cache_and_is_reused(images, tmp_path, monkeypatch):
    memory = UnlabeledImages(images, "cfp", 32)
    barrier = Barrier()
    shared = UnlabeledImages(images, "cfp", 32, shared_cache=SharedCache(tmp_path / "c", True, barrier))
    assert barrier.calls == 1
    assert [str(f) for f in shared.files] == [str(f) for f in memory.files]
    for i in range(len(memory)):
        assert shared[i].dtype == torch.uint8 and torch.equal(shared[i], memory[i])
    assert len(list((tmp_path / "c").glob("*.npy"))) == 1 and not list((tmp_path / "c").glob("*.partial"))

    # a rerun (another rank, or a resume) maps the file without decoding anything
    monkeypatch.setattr(UnlabeledImages, "_load", lambda self, i: pytest.fail("decoded again"))
    follower = UnlabeledImages(images, "cfp", 32, shared_cache=SharedCache(tmp_path / "c", False, Barrier()))
    again = UnlabeledImages(images, "cfp", 32, shared_cache=SharedCache(tmp_path / "c", True, Barrier()))
    for i in range(len(memory)):
        assert torch.equal(follower[i], memory[i]) and torch.equal(again[i], memory[i])


def test_changed_file_or_size_decodes_anew(images, tmp_path):
    folder = tmp_path / "c"
    UnlabeledImages(images, "cfp", 32, shared_cache=SharedCache(folder, True, Barrier()))
    UnlabeledImages(images, "cfp", 24, shared_cache=SharedCache(folder, True, Barrier()))
    assert len(list(folder.glob("*.npy"))) == 2
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(images[0])
    os.utime(images[0], ns=(1, 1))
    data = UnlabeledImages(images, "cfp", 32, shared_cache=SharedCache(folder, True, Barrier()))
    assert len(list(folder.glob("*.npy"))) == 3
    assert int(data[0].max()) == 0


def test_follower_without_leader_file_fails_clearly(images, tmp_path):
    with pytest.raises(DataError, match="shared image cache .* missing"):
        UnlabeledImages(images, "cfp", 32, shared_cache=SharedCache(tmp_path / "c", False, Barrier()))


def test_shared_cache_keeps_corrupt_file_rules(images, tmp_path):
    bad = images[0].parent / "bad.png"
    bad.write_bytes(images[0].read_bytes()[:60])
    with pytest.raises(Exception, match="bad.png"):
        UnlabeledImages(images + [bad], "cfp", 32, shared_cache=SharedCache(tmp_path / "c", True, Barrier()))
    data = UnlabeledImages(images + [bad], "cfp", 32, skip_corrupt=True,
                           shared_cache=SharedCache(tmp_path / "c", True, Barrier()))
    follower = UnlabeledImages(images + [bad], "cfp", 32, skip_corrupt=True,
                               shared_cache=SharedCache(tmp_path / "c", False, Barrier()))
    assert len(data) == len(follower) == 3 and follower.skipped == [str(bad)]
