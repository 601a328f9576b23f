"""Run by test_distributed.py: one DINO step's gradients on a fixed global batch, single process or under
torchrun (each rank taking its slice of the batch, as EpochBatchSampler hands it out)."""

import os
import sys

import torch
import torch.distributed as dist
from lightly.loss import DINOLoss
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from visionfm.engine.sampler import EpochBatchSampler  # noqa: E402
from visionfm.models.vit import create_encoder  # noqa: E402
from visionfm.objectives.dino import DINOModel  # noqa: E402


def main(out_path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", 16, 32)
    model = DINOModel(encoder, encoder.embed_dim, out_dim=64, hidden_dim=32, bottleneck_dim=16, freeze_last_layer_epochs=0)
    generator = torch.Generator().manual_seed(123)
    global_views = [torch.randn(8, 3, 32, 32, generator=generator) for _ in range(2)]
    local_views = [torch.randn(8, 3, 16, 16, generator=generator) for _ in range(2)]
    per_rank = 8 // world
    sampler = EpochBatchSampler(8, per_rank, seed=0, rank=rank, world_size=world)
    index = torch.tensor(next(iter(sampler)))
    global_views = [v[index] for v in global_views]
    local_views = [v[index] for v in local_views]
    student = DistributedDataParallel(model.student) if world > 1 else model.student
    loss_fn = DINOLoss(64)
    teacher_out = model.teacher(global_views)
    loss = loss_fn(teacher_out, student(global_views + local_views), teacher_temp=0.04)
    loss.backward()
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "center": loss_fn.center.clone()}, out_path)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
