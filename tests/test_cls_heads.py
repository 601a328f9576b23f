"""Classification components: task losses, heads, pooled features, k-NN, the probe and layer-wise lr decay."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from visionfm.tasks.classification.features import extract_features, feature_dim, pooled_features
from visionfm.tasks.classification.finetune import EncoderClassifier, finetune_param_groups, interpolate_weights
from visionfm.tasks.classification.heads import OrdinalOutput, Standardize, build_head, load_probe_into_head
from visionfm.tasks.classification.knn import knn_scores
from visionfm.tasks.classification.probe import ProbeConfig, cosine_schedule, train_probe
from visionfm.tasks.classification.selection import Selector, resolve_select_metric
from visionfm.tasks.classification.task import ClassificationTask

BINARY = ClassificationTask("multiclass", ("no", "yes"))
GRADES = ClassificationTask("ordinal", ("0", "1", "2", "3"))
LABELS = ClassificationTask("multilabel", ("a", "b", "c"))


def tiny_vit(seed=0, depth=2):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=depth, num_heads=2, num_classes=0,
                             dynamic_img_size=True).eval()


def test_ordinal_targets_loss_and_probabilities():
    y = torch.tensor([0, 1, 3])
    assert GRADES.cumulative_targets(y).tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 1]]
    soft = torch.tensor([[0.5, 0.0, 0.5, 0.0]])  # mixup of grade 0 and grade 2
    assert GRADES.cumulative_targets(soft).tolist() == [[0.5, 0.5, 0.0]]
    logits = torch.tensor([[3.0, 0.5, -2.0], [-4.0, -5.0, -6.0], [2.0, 3.0, 1.0]])  # last: crossing thresholds
    probs = GRADES.probabilities(logits)
    assert torch.allclose(probs.sum(1), torch.ones(3)) and (probs >= 0).all()
    assert GRADES.predict(probs).tolist() == [2, 0, 3]
    expected = F.binary_cross_entropy_with_logits(logits, GRADES.cumulative_targets(y))
    assert torch.isclose(GRADES.loss(logits, y), expected)


def test_multiclass_and_multilabel_losses():
    logits = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    assert torch.isclose(BINARY.loss(logits, y), F.cross_entropy(logits, y))
    soft = F.one_hot(y, 2).float()
    assert torch.isclose(BINARY.loss(logits, soft), F.cross_entropy(logits, y))  # soft = hard for one-hot
    ml_logits, ml_y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    assert torch.isclose(LABELS.loss(ml_logits, ml_y), F.binary_cross_entropy_with_logits(ml_logits, ml_y))
    assert LABELS.predict(torch.tensor([[0.7, 0.2, 0.5]])).tolist() == [[1, 0, 1]]
    with pytest.raises(ValueError, match="label kind"):
        ClassificationTask("regression", ("a", "b"))


def test_heads_shapes_and_ordinal_rank_consistency():
    x = torch.randn(5, 16)
    assert build_head("linear", 16, BINARY)(x).shape == (5, 2)
    assert build_head("mlp", 16, LABELS, hidden_dim=8, dropout=0.1)(x).shape == (5, 3)
    head = build_head("mlp", 16, GRADES, hidden_dim=8)
    out = head(x)
    assert out.shape == (5, 3) and isinstance(head[-1], OrdinalOutput)
    assert torch.allclose(out[:, 0] - out[:, 1], (head[-1].bias[0] - head[-1].bias[1]).expand(5))  # shared slope
    small = build_head("linear", 16, BINARY, init_std=2e-5)
    assert small[-1].weight.abs().max() < 1e-4 and small[-1].bias.abs().max() == 0
    with pytest.raises(ValueError, match="head"):
        build_head("transformer", 16, BINARY)


def test_standardize_shrinks_towards_global_variance():
    feats = torch.randn(2000, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 5
    big = Standardize.fit(feats, prior=10)(feats)
    assert torch.allclose(big.mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(big.std(0), torch.ones(4), atol=0.02)
    two = Standardize.fit(feats[:2], prior=10)
    ratio = two.std / two.std.mean()
    assert (ratio.max() / ratio.min()) < 1.5  # two samples: close to one global scale


def test_pooled_features_match_the_encoder():
    vit = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
        assert torch.allclose(pooled_features(vit, x, "cls"), tokens[:, 0])
        assert torch.allclose(pooled_features(vit, x, "mean"), tokens[:, 1:].mean(1))
        both = pooled_features(vit, x, "cls+mean", last_blocks=2)
        assert both.shape == (3, feature_dim(vit, "cls+mean", 2)) == (3, 192)
        # The last block's part of the concatenation is the final (normed) output.
        assert torch.allclose(both[:, 96:144], tokens[:, 0], atol=1e-5)
        # The first block's part: run block 0 by hand and apply the final norm.
        h = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        first = vit.norm(vit.blocks[0](h))
        assert torch.allclose(both[:, :48], first[:, 0], atol=1e-5)
        assert torch.allclose(both[:, 48:96], first[:, 1:].mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="last_blocks"):
        pooled_features(vit, x, "cls", last_blocks=3)


def test_extract_features_is_batched_consistently():
    vit = tiny_vit()
    data = [(torch.randn(3, 32, 32), torch.tensor(i % 2)) for i in range(5)]
    f1, y1 = extract_features(vit, data, "cls", batch_size=2)
    f2, _ = extract_features(vit, data, "cls", batch_size=5)
    assert f1.shape == (5, 48) and f1.dtype == torch.float32 and y1.tolist() == [0, 1, 0, 1, 0]
    assert torch.allclose(f1, f2, atol=1e-5)
    f3, _ = extract_features(vit, data, "cls", batch_size=5, amp_dtype=torch.bfloat16)
    assert f3.dtype == torch.float32 and torch.allclose(f1, f3, atol=0.1)


def test_knn_matches_direct_weighted_vote():
    torch.manual_seed(0)
    train, query = torch.randn(30, 8), torch.randn(6, 8)
    y = torch.randint(0, 3, (30,))
    task = ClassificationTask("multiclass", ("a", "b", "c"))
    scores = knn_scores(train, y, query, task, k=5, temperature=0.1, chunk=4)
    for q in range(6):
        sims = F.cosine_similarity(query[q:q + 1], train)
        top = sims.topk(5).indices
        votes = torch.zeros(3)
        for i in top:
            votes[y[i]] += math.exp(sims[i] / 0.1)
        assert torch.allclose(scores[q], votes / votes.sum(), atol=1e-5)
    ml = knn_scores(train, torch.randint(0, 2, (30, 3)).float(), query, LABELS, k=100)  # k capped at 30
    assert ml.shape == (6, 3) and (ml >= 0).all() and (ml <= 1).all()


def test_probe_learns_and_selects_on_validation_only():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 6) + 1.5, torch.randn(40, 6) - 1.5])
    y = torch.tensor([1] * 40 + [0] * 40)
    head, sel = train_probe(x, y, x, y, BINARY, ProbeConfig(epochs=20, weight_decays=(0.0, 0.1), batch_size=16))
    assert sel["val_auroc"] > 0.95 and sel["weight_decay"] in (0.0, 0.1)
    assert len(sel["candidates"]) == 2 and sel["steps_per_candidate"] == 20 * 5
    # Flipped validation labels: the selection follows validation, so it keeps the least-trained candidate.
    _, flipped = train_probe(x, y, x, 1 - y, BINARY, ProbeConfig(epochs=20, weight_decays=(0.0,), batch_size=16))
    assert flipped["epoch"] == 1
    _, capped = train_probe(x, y, x, y, BINARY, ProbeConfig(epochs=20, weight_decays=(0.0,), max_steps=3))
    assert capped["steps_per_candidate"] == 3


def test_selection_metric_and_selector():
    assert resolve_select_metric(GRADES) == "kappa" and resolve_select_metric(BINARY) == "auroc"
    with pytest.raises(ValueError):
        resolve_select_metric(BINARY, "kappa")
    sel = Selector("auroc")
    assert sel.offer({"auroc": 0.8}, 0.5, {"epoch": 1}, lambda: "a")
    assert not sel.offer({"auroc": 0.8}, 0.6, {"epoch": 2}, lambda: "b")  # tie, higher loss
    assert sel.offer({"auroc": 0.8}, 0.4, {"epoch": 3}, lambda: "c")  # tie, lower loss
    assert not sel.offer({"auroc": float("nan")}, 0.1, {"epoch": 4}, lambda: "d")
    assert sel.state == "c" and sel.best["epoch"] == 3


def test_cosine_schedule():
    lrs = cosine_schedule(1.0, 0.0, 10, warmup_steps=2)
    assert len(lrs) == 10 and lrs[1] == pytest.approx(1.0) and lrs[0] == pytest.approx(0.5)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.05 and torch.all(lrs[2:][1:] <= lrs[2:][:-1])


def test_layer_decay_groups():
    vit = tiny_vit(depth=2)
    model = EncoderClassifier(vit, build_head("linear", 48, BINARY), "cls")
    groups = finetune_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(scale_of) == sum(1 for p in model.parameters())
    assert scale_of[id(model.head[-1].weight)] == 1.0 and scale_of[id(vit.norm.weight)] == 1.0
    # BEiT/MAE counting: last block one step below the head, embeddings at layer_decay ** (depth + 1).
    assert scale_of[id(vit.blocks[1].attn.qkv.weight)] == pytest.approx(0.5)
    assert scale_of[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.25)
    assert scale_of[id(vit.patch_embed.proj.weight)] == pytest.approx(0.125)
    assert scale_of[id(vit.cls_token)] == pytest.approx(0.125)
    assert decay_of[id(vit.pos_embed)] == 0.0 and decay_of[id(vit.cls_token)] == 0.0
    assert decay_of[id(vit.blocks[0].norm1.weight)] == 0.0 and decay_of[id(model.head[-1].bias)] == 0.0
    assert decay_of[id(vit.blocks[0].mlp.fc1.weight)] == 0.05 and decay_of[id(model.head[-1].weight)] == 0.05


@pytest.mark.parametrize("kind, task", [("linear", BINARY), ("mlp", BINARY), ("linear", GRADES), ("mlp", LABELS)])
def test_probe_folds_into_finetuning_head(kind, task):
    """LP-FT: the fine-tuning head (no standardisation, dropout where asked) starts with the probe's logits."""
    torch.manual_seed(0)
    features = torch.randn(40, 16) * torch.linspace(0.1, 5.0, 16) + torch.linspace(-3.0, 3.0, 16)
    probe = build_head(kind, 16, task, hidden_dim=8, standardize=Standardize.fit(features))
    for p in probe.parameters():  # a trained-looking probe, not the near-zero start
        torch.nn.init.normal_(p)
    head = build_head(kind, 16, task, hidden_dim=8, dropout=0.3, init_std=2e-5).eval()
    before = head(features)
    load_probe_into_head(probe, head)
    assert not torch.allclose(before, probe(features), atol=1e-3)
    assert torch.allclose(head(features), probe(features), atol=1e-4)
    assert not any(isinstance(m, Standardize) for m in head)


def test_probe_into_head_refuses_mismatches():
    features = torch.randn(10, 16)
    probe = build_head("linear", 16, BINARY, standardize=Standardize.fit(features))
    with pytest.raises(ValueError, match="do not match"):
        load_probe_into_head(probe, build_head("mlp", 16, BINARY, hidden_dim=8))
    with pytest.raises(ValueError, match="Standardize"):
        load_probe_into_head(build_head("linear", 16, BINARY), build_head("linear", 16, BINARY))
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_probe_into_head(probe, build_head("linear", 32, BINARY))


def test_interpolate_weights_lies_between_the_two_states():
    """WiSE-FT's weights: the start at 0, the fine-tuned state at 1, the linear path in between; integer buffers
    come from the fine-tuned state; mismatched states and weights outside [0, 1] are refused by name."""
    start = {"w": torch.zeros(2, 3), "b": torch.full((3,), 4.0), "count": torch.tensor(1)}
    end = {"w": torch.ones(2, 3), "b": torch.zeros(3), "count": torch.tensor(7)}
    mid = interpolate_weights(start, end, 0.25)
    assert torch.allclose(mid["w"], torch.full((2, 3), 0.25)) and torch.allclose(mid["b"], torch.full((3,), 3.0))
    assert int(mid["count"]) == 7
    assert all(torch.equal(interpolate_weights(start, end, 1.0)[k], end[k]) for k in end)
    assert all(torch.equal(interpolate_weights(start, end, 0.0)[k].float(), v.float())
               for k, v in start.items() if v.is_floating_point())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_weights(start, end, 1.5)
    with pytest.raises(ValueError, match="only after \\['extra'\\]"):
        interpolate_weights(start, {**end, "extra": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="b: shape"):
        interpolate_weights(start, {**end, "b": torch.zeros(4)}, 0.5)
