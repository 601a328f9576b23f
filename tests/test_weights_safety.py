"""Pickled checkpoints load with ``weights_only=True`` plus an allow-list; code-running pickles are refused."""

from __future__ import annotations

import argparse
import os
from fractions import Fraction

import pytest
import torch

from visionfm.weights import UnsafeCheckpointError, load_checkpoint, load_encoder, read_foreign_checkpoint


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 192)}, "args": _RunsCode(str(marker))}, path)
    return path, marker


def test_code_running_pickle_is_refused_and_does_not_run(tmp_path):
    path, marker = evil_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(err.value)
    assert str(path) in message and f"{os.system.__module__}.system" in message
    assert "arbitrary code" in message and "--trust-pickle" in message and "allow_pickle=True" in message


def test_loaders_refuse_it_too(tmp_path):
    path, marker = evil_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        read_foreign_checkpoint(path, "cfp")
    with pytest.raises(UnsafeCheckpointError):
        load_encoder("cfp", weights=path)
    assert not marker.exists()


def test_argparse_namespace_is_allowed(tmp_path):
    torch.save({"args": argparse.Namespace(arch="vit_base", modality="Fundus", pred_ratio=[0.3]),
                "epoch": 3, "teacher": {"backbone.cls_token": torch.ones(1, 1, 4)}}, tmp_path / "vfm.pth")
    ckpt = load_checkpoint(tmp_path / "vfm.pth")
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].modality == "Fundus"
    assert torch.equal(ckpt["teacher"]["backbone.cls_token"], torch.ones(1, 1, 4))


def test_other_classes_need_the_opt_in(tmp_path):
    torch.save({"best": Fraction(1, 3), "model": {"w": torch.ones(2)}}, tmp_path / "frac.pth")
    with pytest.raises(UnsafeCheckpointError, match="fractions.Fraction"):
        load_checkpoint(tmp_path / "frac.pth")
    ckpt = load_checkpoint(tmp_path / "frac.pth", allow_pickle=True)
    assert ckpt["best"] == Fraction(1, 3)


def test_unreadable_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "broken.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_checkpoint(tmp_path / "absent.pth")


def test_allow_list_is_scoped_to_our_loads(tmp_path):
    """The allow-list applies inside our loader only; it does not widen torch's safe globals for the process."""
    torch.save({"args": argparse.Namespace(arch="vit_base")}, tmp_path / "ns.pth")
    load_checkpoint(tmp_path / "ns.pth")
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(tmp_path / "ns.pth", weights_only=True)
