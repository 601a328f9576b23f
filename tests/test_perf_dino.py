"""The fast DINO step computes what the plain one does: lightly's loss, timm's forward and attention, stochastic
depth, and a whole optimiser step against the textbook reference of ``benchmarks/pretrain_step.py``."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
from lightly.loss import DINOLoss as LightlyDINOLoss
from timm.layers import DropPath

from visionfm.engine.dino_trainer import make_adamw
from visionfm.engine.threads import fastest_cpu_threads
from visionfm.models import vit as vit_module
from visionfm.models.vit import ExplicitAttention, cls_features, create_encoder, set_fused_attention
from visionfm.objectives.dino import DINOLoss

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("pretrain_step_bench", ROOT / "benchmarks" / "pretrain_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n_teacher,n_student", [(2, 8), (2, 2), (1, 3), (3, 2)])
def test_dino_loss_matches_lightly(n_teacher, n_student):
    torch.manual_seed(0)
    k, b = 64, 5
    teacher = torch.randn(n_teacher, b, k)
    student = torch.randn(n_student, b, k, requires_grad=True)
    ref, ours = LightlyDINOLoss(k, center_momentum=0.9), DINOLoss(k, center_momentum=0.9)
    ref.center.normal_()
    ours.center.copy_(ref.center)
    fresh = copy.deepcopy(ours)
    loss_ref = ref(list(teacher), list(student), teacher_temp=0.05)
    grad_ref, = torch.autograd.grad(loss_ref, student)
    loss = ours(teacher, student, teacher_temp=0.05)  # stacked (V, B, K)
    grad, = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
    assert torch.allclose(grad, grad_ref, atol=1e-7, rtol=1e-5)
    assert torch.allclose(ours.center, ref.center, atol=1e-7)
    # lists of views are accepted too
    assert fresh(list(teacher), list(student), teacher_temp=0.05).item() == pytest.approx(loss_ref.item(), rel=1e-6)
    assert ours.state_dict().keys() == ref.state_dict().keys()


def test_dino_loss_needs_two_views():
    with pytest.raises(ValueError, match="two views"):
        DINOLoss(8)(torch.randn(1, 2, 8), torch.randn(1, 2, 8), teacher_temp=0.04)


@pytest.mark.parametrize("fused", [True, False])
def test_cls_features_equals_encoder_forward(fused):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", 16, 64, drop_path_rate=0.1).eval()
    assert set_fused_attention(encoder, fused) == 12
    x = torch.randn(3, 3, 64, 64)
    proj = torch.randn(3, encoder.embed_dim)
    expected = encoder(x)
    got = cls_features(encoder, x)
    assert torch.allclose(got, expected, atol=1e-5)
    w = encoder.blocks[0].attn.qkv.weight
    g_expected, = torch.autograd.grad((encoder(x) * proj).sum(), w)
    g_got, = torch.autograd.grad((cls_features(encoder, x) * proj).sum(), w)
    assert torch.allclose(g_got, g_expected, atol=1e-4, rtol=1e-4)
    # other image sizes (DINO's local crops) go through the same path
    assert torch.allclose(cls_features(encoder, x[..., :32, :32]), encoder(x[..., :32, :32]), atol=1e-5)


def test_explicit_attention_is_timm_attention():
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", 16, 32)
    keys = list(encoder.state_dict())
    attn = encoder.blocks[0].attn
    x = torch.randn(2, 5, encoder.embed_dim, requires_grad=True)
    fused = attn(x)
    set_fused_attention(encoder, False)
    assert type(attn) is ExplicitAttention and not attn.fused_attn
    explicit = attn(x)
    assert torch.allclose(explicit, fused, atol=1e-5)
    assert list(encoder.state_dict()) == keys
    assert type(copy.deepcopy(encoder).blocks[0].attn) is ExplicitAttention
    set_fused_attention(encoder, True)
    assert type(attn).__name__ == "Attention" and attn.fused_attn


def test_drop_path_skips_dropped_samples_exactly():
    """The branch computed for kept samples only equals timm-style masking with the same Bernoulli draw."""
    torch.manual_seed(0)
    drop = DropPath(0.5).train()
    x = torch.randn(16, 4, 8)
    branch = torch.nn.Linear(8, 8)
    calls = []

    def fn(rows):
        calls.append(rows.shape[0])
        return branch(rows)

    torch.manual_seed(1)
    got = vit_module._residual(x, x, fn, drop)
    torch.manual_seed(1)
    mask = torch.empty(16).bernoulli_(0.5)
    expected = x + branch(x) * (mask / 0.5).view(-1, 1, 1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert calls == [int(mask.sum())] and 0 < calls[0] < 16  # the branch saw the kept samples only
    drop.eval()
    assert torch.allclose(vit_module._residual(x, x, branch, drop), x + branch(x))


def test_training_step_matches_textbook_reference(tmp_path):
    """One whole step in fp32 (fused AdamW with clipping folded in, EMA, stacked loss, explicit attention, CLS-only
    last block) leaves the same student and teacher as the textbook DINO step."""
    bench = _bench()
    args = bench.main.__globals__["argparse"].Namespace(
        out_dim=256, global_size=32, local_size=16, local_crops=2, precision="fp32", seed=0,
        # clipping active, a learning rate and teacher momentum that move the weights visibly in one step
        set=["optim.clip_grad=0.05", "optim.lr=10.0", "optim.warmup_epochs=0", "dino.momentum_teacher=0.5"])
    device = torch.device("cpu")
    torch.manual_seed(0)
    trainer = bench.build_ours(args, "vit_tiny", 3, device)
    cfg = trainer.cfg
    ref = bench.ReferenceDINO("vit_tiny", 16, 32, cfg["model"]["drop_path_rate"], cfg["head"], 4, cfg["dino"],
                              cfg["optim"]["clip_grad"], device)
    ref.load_from(trainer.model.student.state_dict(), trainer.model.teacher.state_dict())
    before = {"student": copy.deepcopy(trainer.model.student.state_dict()),
              "teacher": copy.deepcopy(trainer.model.teacher.state_dict())}
    g = [torch.randn(3, 3, 32, 32) for _ in range(2)]
    loc = [torch.randn(3, 3, 16, 16) for _ in range(2)]
    step, s = bench.FIRST_STEP, trainer.schedules
    with bench.drop_path_off([trainer.model, *ref.modules()]):
        ours = trainer.train_step_views(g, loc, step, bench.EPOCH)
        theirs = ref.step(g, loc, float(s.lr[step]), float(s.weight_decay[step]), float(s.momentum[step]),
                          float(s.teacher_temp[step]))
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    assert ours["grad_norm"] > 0.05  # clipping was active
    for name, mine, other in (("student", trainer.model.student, ref.student),
                              ("teacher", trainer.model.teacher, ref.teacher)):
        a, b, old = mine.state_dict(), other.state_dict(), before[name]
        assert a.keys() == b.keys()
        # Compare the updates as a whole: Adam's first step g / (|g| + eps) makes single near-zero gradient entries
        # (where float summation order decides the last digits) differ element-wise at this learning rate.
        diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in a).sqrt()
        update = sum(((b[k] - old[k]).double() ** 2).sum() for k in a).sqrt()
        assert update > 0.1, (name, update)  # the step moved the weights a lot ...
        assert diff < 1e-3 * update, (name, diff, update)  # ... and both steps moved them the same way
    assert torch.allclose(trainer.loss_fn.center.view(-1), ref.loss.center.view(-1), atol=1e-7)


def test_benchmark_reports_ratio_and_mfu(tmp_path):
    bench = _bench()
    out = tmp_path / "bench.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = bench.main(["--arch", "vit_tiny", "--batch-size", "2", "--global-size", "32", "--local-size", "16",
                         "--local-crops", "2", "--out-dim", "128", "--repeats", "1", "--threads", "1",
                         "--json", str(out)])
    assert rc == 0
    row = json.loads(out.read_text())[0]
    for key in ("ratio", "mfu", "reference_mfu", "ours_peak_mb", "reference_peak_mb", "ours_loss", "reference_loss"):
        assert row[key] > 0, key
    assert row["loss_rel_diff"] < 2 ** -8


def test_fastest_cpu_threads_restores_setting():
    before = torch.get_num_threads()
    chosen = fastest_cpu_threads(max_threads=2, trials=1)
    assert chosen in (1, 2)
    assert torch.get_num_threads() == before


def test_fastest_cpu_threads_times_the_training_dtype():
    # A bf16 probe on a CPU without native bf16 hits a slow path that does not scale with threads and picked
    # 1 thread for fp32 training that ran 2x faster on 2 cores: the probe must compute in the dtype it is given.
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class RecordMatmulDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.mm.default:
                seen.add(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with RecordMatmulDtypes():
        fastest_cpu_threads(max_threads=2, trials=1, dtype=None)
    assert seen == {torch.float32}
    seen.clear()
    with RecordMatmulDtypes():
        fastest_cpu_threads(max_threads=2, trials=0, dtype=torch.float64)
    assert seen == {torch.float64}


def test_make_adamw_is_fused_on_cpu():
    p = torch.nn.Parameter(torch.randn(4))
    assert make_adamw([{"params": [p]}]).defaults["fused"]
