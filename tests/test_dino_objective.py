import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss

from visionfm.models.vit import create_encoder
from visionfm.objectives.dino import DINOModel, DINOSchedules, cosine_schedule


def paper_dino_loss(teacher_out, student_out, center, teacher_temp, student_temp):
    """The DINO paper's loss written out: average over pairs (t, s), t != s, of
    H(softmax((t - c) / T_t), softmax(s / T_s))."""
    total, terms = 0.0, 0
    for ti, t in enumerate(teacher_out):
        p_t = F.softmax((t - center) / teacher_temp, dim=-1)
        for si, s in enumerate(student_out):
            if si == ti:
                continue
            total = total + torch.sum(-p_t * F.log_softmax(s / student_temp, dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def test_lightly_dino_loss_matches_the_paper_formula_and_updates_the_centre():
    torch.manual_seed(0)
    dim, batch = 32, 5
    loss_fn = DINOLoss(dim, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, 1, dim) * 0.1)
    center = loss_fn.center.clone()
    teacher = [torch.randn(batch, dim) for _ in range(2)]
    student = [torch.randn(batch, dim) for _ in range(5)]
    got = loss_fn(teacher, student, teacher_temp=0.04)
    want = paper_dino_loss(teacher, student, center.view(1, dim), 0.04, 0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    expected_center = 0.9 * center + 0.1 * torch.cat(teacher).mean(0).view(1, 1, dim)
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_multicrop_network_groups_views_without_changing_results():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", 16, 32)
    model = DINOModel(enc, enc.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16).eval()
    views = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    grouped = model.student(views)
    separate = [model.student.head(model.student.backbone(v)) for v in views]
    for a, b in zip(grouped, separate):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_teacher_starts_equal_has_no_grad_and_follows_by_ema():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", 16, 32)
    model = DINOModel(enc, enc.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16)
    for s, t in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(s, t) and not t.requires_grad
    before = [t.clone() for t in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    model.update_teacher(0.9)
    for b, s, t in zip(before, model.student.parameters(), model.teacher.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_cosine_schedule_warmup_and_end_points():
    values = cosine_schedule(1.0, 0.1, total_iters=20, warmup_iters=5, warmup_start=0.0)
    assert len(values) == 20
    np.testing.assert_allclose(values[:5], [0.0, 0.2, 0.4, 0.6, 0.8])
    assert values[5] == 1.0 and abs(values[-1] - 0.1) < 0.01
    assert np.all(np.diff(values[5:]) <= 0)


def test_schedules_scale_lr_with_global_batch_and_warm_up_teacher_temperature():
    optim = {"lr": 0.0005, "min_lr": 1e-6, "warmup_epochs": 1, "weight_decay": 0.04, "weight_decay_end": 0.4}
    dino = {"momentum_teacher": 0.996, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 2}
    s = DINOSchedules.build(optim, dino, epochs=4, iters_per_epoch=10, global_batch=512)
    assert len(s) == 40
    assert s.lr.max() == 0.0005 * 512 / 256
    assert abs(s.weight_decay[0] - 0.04) < 1e-9 and abs(s.weight_decay[-1] - 0.4) < 1e-3
    assert abs(s.momentum[0] - 0.996) < 1e-9 and s.momentum[-1] > 0.9999
    assert s.teacher_temp[0] == 0.04 and s.teacher_temp[19] == 0.07 and s.teacher_temp[-1] == 0.07
