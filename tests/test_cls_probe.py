"""The linear probe on the shared training loop: the same head as the probe's plain loop (bit for bit), a progress bar
and TensorBoard scalars per weight decay, and the loop's NaN guard."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from visionfm.errors import NonFiniteLossError
from visionfm.tasks.classification.heads import Standardize, build_head
from visionfm.tasks.classification.probe import ProbeConfig, _param_groups, cosine_schedule, train_probe
from visionfm.tasks.classification.task import ClassificationTask

TASK = ClassificationTask("multiclass", ("a", "b", "c"))


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 12, generator=g)
    x[:, 0] += y.float()
    return x, y


def _plain_probe(x, y, task, cfg: ProbeConfig, seed: int):
    """The probe's recipe as a plain loop (its own loop before it ran on TrainLoop): the head of every
    (weight decay, epoch)."""
    n = x.shape[0]
    norm = Standardize.fit(x, prior=cfg.standardize_prior)
    batch = min(cfg.batch_size, n)
    per_epoch = math.ceil(n / batch)
    total = min(cfg.epochs * per_epoch, cfg.max_steps or cfg.epochs * per_epoch)
    lrs = cosine_schedule(cfg.lr, cfg.min_lr, total, cfg.warmup_epochs * per_epoch)
    heads = {}
    for wd in cfg.weight_decays:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        head = build_head(cfg.head, x.shape[1], task, cfg.hidden_dim, cfg.dropout, copy.deepcopy(norm))
        opt = torch.optim.AdamW(_param_groups(head, float(wd)), lr=cfg.lr)
        step = 0
        for epoch in range(math.ceil(total / per_epoch)):
            head.train()
            order = torch.randperm(n, generator=gen)
            for start in range(0, n, batch):
                if step >= total:
                    break
                for group in opt.param_groups:
                    group["lr"] = float(lrs[step])
                loss = task.loss(head(x[order[start:start + batch]]), y[order[start:start + batch]])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
            heads[(float(wd), epoch + 1)] = copy.deepcopy(head.state_dict())
    return heads


@pytest.mark.parametrize("cfg", [
    ProbeConfig(epochs=6, batch_size=8, weight_decays=(0.0, 0.5), lr=0.01),                    # 4 steps an epoch
    ProbeConfig(head="mlp", hidden_dim=8, dropout=0.3, epochs=9, warmup_epochs=2, weight_decays=(0.1,), lr=0.01),
    ProbeConfig(epochs=6, batch_size=8, weight_decays=(0.0,), max_steps=6, lr=0.01),           # a cut last epoch
])
def test_probe_on_the_loop_is_the_plain_loop(cfg):
    x, y = _data(30, 0)
    xv, yv = _data(20, 1)
    head, sel = train_probe(x, y, xv, yv, TASK, cfg, seed=4)
    expected = _plain_probe(x, y, TASK, cfg, seed=4)[(sel["weight_decay"], sel["epoch"])]
    assert head.state_dict().keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(head.state_dict()[key], value), key
    per_epoch = math.ceil(30 / min(cfg.batch_size, 30))
    assert sel["step"] == min(sel["epoch"] * per_epoch, cfg.max_steps or 10**9)


def test_progress_and_tensorboard_per_weight_decay(tmp_path: Path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    x, y = _data(30, 0)
    writer = SummaryWriter(str(tmp_path))
    train_probe(x, y, x, y, TASK, ProbeConfig(epochs=5, batch_size=10, weight_decays=(0.0, 0.1)), writer=writer)
    writer.close()
    err = capsys.readouterr().err
    assert "probe wd 0: 100%" in err and "probe wd 0.1: 100%" in err
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for wd in ("0", "0.1"):
        assert {f"probe_wd_{wd}/train/loss", f"probe_wd_{wd}/train/lr", f"probe_wd_{wd}/val_loss",
                f"probe_wd_{wd}/val_auroc"} <= tags
        assert [e.step for e in events.Scalars(f"probe_wd_{wd}/train/loss")] == [1, 3, 6, 9, 12, 15]  # first + epochs
        assert [e.step for e in events.Scalars(f"probe_wd_{wd}/val_loss")] == [1, 2, 3, 4, 5]  # epochs


def test_non_finite_probe_loss_stops_with_the_loop_message():
    x, y = _data(30, 0)
    cfg = ProbeConfig(epochs=3, batch_size=10, weight_decays=(0.0, 0.1), lr=float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"probe wd 0: the loss is nan at step 2; lower linear.lr"):
        train_probe(x, y, x, y, TASK, cfg)


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    y = torch.tensor([0, 1, 1, 1, 2, 2])
    w = TASK.balanced_class_weights(y)
    assert torch.allclose(w, torch.tensor([2.0, 2 / 3, 1.0]))
    assert torch.allclose(torch.bincount(y).float() * w, torch.full((3,), 2.0))   # n / C each
    with pytest.raises(ValueError, match="no training image of class c"):
        TASK.balanced_class_weights(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="multi-class"):
        ClassificationTask("ordinal", ("0", "1", "2")).balanced_class_weights(y)
    # the weighted loss is the weighted mean of the per-image cross-entropies
    logits = torch.randn(6, 3)
    per_image = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(TASK.loss(logits, y, w), (per_image * w[y]).sum() / w[y].sum())


def test_balanced_probe_recalls_the_minority_class():
    """Overlapping classes at 9:1: the plain probe favours the majority; the balanced loss trades majority
    accuracy for minority recall and a higher balanced accuracy (the EyeDisease4 headline metric)."""
    task = ClassificationTask("multiclass", ("common", "rare"))
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(600, generator=g) < 0.1).long()
    x = torch.randn(600, 4, generator=g)
    x[:, 0] += 2.0 * y.float()
    recall = {}
    for weighting in ("none", "balanced"):
        head, selection = train_probe(x, y, x, y, task, ProbeConfig(epochs=30, weight_decays=(0.0,), lr=0.1,
                                                                     class_weight=weighting))
        assert selection["class_weight"] == weighting
        with torch.no_grad():
            pred = head(x).argmax(1)
        recall[weighting] = [float((pred[y == c] == c).float().mean()) for c in (0, 1)]
    assert recall["balanced"][1] > recall["none"][1] + 0.2   # measured: 0.79 vs 0.49
    assert sum(recall["balanced"]) > sum(recall["none"]) + 0.05   # 1.60 vs 1.48
    with pytest.raises(ValueError, match="class_weight must be one of"):
        train_probe(x, y, x, y, task, ProbeConfig(epochs=1, class_weight="inverse"))
