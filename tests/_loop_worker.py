"""Run by test_engine_loop.py, as one process or under ``torchrun``: a short fine-tuning on
:class:`visionfm.engine.loop.TrainLoop` (``finetune``) or CLIP's gathered contrastive step (``clip``), with the
per-rank batch given on the command line. Rank 0 writes the final weights to ``<out>/weights.pt``."""

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from visionfm.engine.distributed import barrier, cleanup  # noqa: E402
from visionfm.engine.loop import RunContext  # noqa: E402
from visionfm.engine.precision import backward_and_step  # noqa: E402
from visionfm.objectives.contrastive import label_aware_loss  # noqa: E402
from visionfm.tasks.classification.finetune import EncoderClassifier, FinetuneConfig, finetune  # noqa: E402
from visionfm.tasks.classification.heads import build_head  # noqa: E402
from visionfm.tasks.classification.task import ClassificationTask  # noqa: E402


def run_finetune(out: Path, batch: int) -> dict:
    ctx = RunContext.start(torch.device("cpu"), out)
    data = torch.Generator().manual_seed(1)
    # 11 training images: global batches of 4, 4 and 3 (the last one cut 1 + 2 over two ranks); 5 validation images
    train = TensorDataset(torch.randn(11, 3, 32, 32, generator=data), torch.randint(0, 2, (11,), generator=data))
    val = TensorDataset(torch.randn(5, 3, 32, 32, generator=data), torch.tensor([0, 1, 0, 1, 1]))
    task = ClassificationTask("multiclass", ("no", "yes"))
    torch.manual_seed(0)
    # No qkv bias: the key bias gets no gradient in exact arithmetic, and Adam would turn the float noise it gets
    # instead (different on 1 and 2 processes) into full-size steps.
    encoder = VisionTransformer(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2, num_classes=0,
                                qkv_bias=False)
    model = EncoderClassifier(encoder, build_head("linear", 48, task), "cls")
    cfg = FinetuneConfig(epochs=2, batch_size=batch, lr=0.05, min_lr=0.0, warmup_epochs=1, augment=False,
                         checkpoint_every_steps=2)
    writer = ctx.writer()
    model, _ = finetune(model, train, val, task, cfg, "cfp", 32, ctx.device, seed=0, writer=writer,
                        resume_path=out / "state.pt", ctx=ctx)
    writer.close()
    return model.state_dict()


def run_clip(out: Path, batch: int) -> dict:
    """Three steps of CLIPTrainer's scheme on fixed features: every rank embeds its share of the global batch,
    the label-aware loss sees the gathered embeddings, gradients are averaged across ranks."""
    ctx = RunContext.start(torch.device("cpu"), out)
    torch.manual_seed(0)
    image_proj, text_proj = torch.nn.Linear(12, 8), torch.nn.Linear(10, 8)
    scale = torch.nn.Parameter(torch.tensor(2.0))
    params = [*image_proj.parameters(), *text_proj.parameters(), scale]
    optimizer = torch.optim.AdamW(params, lr=0.05)
    data = torch.Generator().manual_seed(1)
    images, texts = torch.randn(3, 8, 12, generator=data), torch.randn(3, 8, 10, generator=data)
    labels = torch.tensor([0, 1, 2, 0, 1, 3, 3, 2])
    global_batch = batch * ctx.world_size
    for step in range(3):
        part = ctx.part(global_batch)
        image = ctx.gather_with_grad(F.normalize(image_proj(images[step, :global_batch][part]), dim=-1))
        text = ctx.gather_with_grad(F.normalize(text_proj(texts[step, :global_batch][part]), dim=-1))
        loss = label_aware_loss(image, text, labels[:global_batch], scale.exp())
        backward_and_step(loss, optimizer, None, params, 1.0, after_backward=lambda: ctx.average_gradients(params))
    return {"image": image_proj.state_dict(), "text": text_proj.state_dict(), "scale": scale.detach()}


def main(mode: str, out: str, batch: int) -> None:
    out_path = Path(out)
    weights = run_finetune(out_path, batch) if mode == "finetune" else run_clip(out_path, batch)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(weights, out_path / "weights.pt")
    barrier()
    cleanup()  # a gloo group left alive at exit can abort a rank while its threads are torn down


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
