"""One config system: a default YAML, an experiment YAML and ``key=value`` overrides.

The merged result is a plain nested dict, written next to the run's outputs (``config.yaml``) so that a
run can be reproduced from its folder alone.

Example:
    >>> cfg = merge({"optim": {"lr": 1e-3, "epochs": 10}}, {"optim": {"epochs": 2}})
    >>> apply_overrides(cfg, ["optim.lr=5e-4"])["optim"]
    {'lr': 0.0005, 'epochs': 2}
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

from .errors import VisionFMError

__all__ = ["CONFIG_DIR", "ConfigError", "ConfigMismatchError", "RESUMABLE_KEYS", "load_yaml", "merge", "apply_overrides",
           "build_config", "save_config", "write_run_config", "config_changes", "check_resumable"]

#: The repository's ``configs/`` folder (the package is used from a checkout or an editable install).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(VisionFMError, ValueError):
    """A config file or override that cannot be used."""


class ConfigMismatchError(VisionFMError, ValueError):
    """A run folder's checkpoint was written under a different config."""


#: Settings that may change between a run and its resumption without changing what the run computes.
RESUMABLE_KEYS = frozenset({"train.max_steps", "train.max_seconds", "train.threads", "train.device",
                            "train.log_every", "train.checkpoint_every_steps", "train.resume_with_changes",
                            "data.num_workers", "data.cache", "data.cache_dir", "export.to",
                            "export.data_description"})


def load_yaml(path: "str | os.PathLike") -> Dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base`` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(cfg: Dict[str, Any], dotted: str, value: Any, strict: bool) -> None:
    keys = dotted.split(".")
    node = cfg
    for i, key in enumerate(keys[:-1]):
        if key not in node:
            if strict:
                known = ", ".join(sorted(node)) or "(none)"
                raise ConfigError(f"unknown config key {'.'.join(keys[: i + 1])!r} in override {dotted!r}; keys at "
                                  f"this level: {known}")
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"override {dotted!r}: {'.'.join(keys[: i + 1])!r} is not a section")
        node = node[key]
    if strict and keys[-1] not in node:
        known = ", ".join(sorted(node)) or "(none)"
        raise ConfigError(f"unknown config key {dotted!r}; keys at this level: {known}")
    node[keys[-1]] = _typed_like(node.get(keys[-1]), value, dotted)


#: Numeric settings that also take a word (``test.threshold: val`` = the threshold chosen on validation).
KEYWORD_VALUES = {"test.threshold": ("val",), "data.num_workers": ("auto",), "train.threads": ("auto",),
                  "train.num_workers": ("auto",)}


def _typed_like(current: Any, value: Any, dotted: str) -> Any:
    """``value`` checked against the type of the setting it replaces, so that ``optim.lr=abc`` fails here, naming
    the key, rather than as a ``TypeError`` deep in an optimiser. Numbers convert between int and float where
    nothing is lost; ``None`` defaults, strings and containers take any value (several settings are ``int`` or
    ``[h, w]``, a name or a path)."""
    if current is None or value is None or isinstance(current, (str, list, dict)):
        return value
    if isinstance(value, str) and value.strip().lower() in KEYWORD_VALUES.get(dotted, ()):
        return value.strip().lower()
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} expects true or false, got {value!r}")
        return value
    if isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "infinity"):
                return float(value)
            kind = "an integer" if isinstance(current, int) else "a number"
            raise ConfigError(f"{dotted} expects {kind} (like {current!r}), got {value!r}")
        if isinstance(current, int):  # a fraction stays a float: some integer defaults (warm-up epochs) take one
            return int(value) if float(value).is_integer() else value
        return float(value)
    return value


def apply_overrides(cfg: Dict[str, Any], overrides: Iterable[str], strict: bool = True) -> Dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML (``1e-3``, ``true``, ``[1, 2]``,
    ``{a: 1}``); text with a colon that is not in braces stays text.

    With ``strict`` (the default) a key that is not already in the config is an error, which catches typos
    that would otherwise be silently ignored.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            # "836 images: TVHL:oct" is a sentence, not a mapping; a mapping is written inline, {a: 1, b: 2}
            value = raw
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" (no dot) as a string; users mean a number
                value = float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
            except ValueError:
                pass
        _set_dotted(cfg, key.strip(), value, strict)
    return cfg


def build_config(default: "str | os.PathLike", experiment: Optional["str | os.PathLike"] = None,
                 flags: Optional[Mapping[str, Any]] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Merge, in increasing priority: the default YAML, the experiment YAML, explicit CLI flags
    (dotted keys; ``None`` values mean "not given"), and ``--set`` overrides."""
    cfg = load_yaml(default)
    if experiment:
        cfg = merge(cfg, load_yaml(experiment))
    for key, value in (flags or {}).items():
        if value is not None:
            _set_dotted(cfg, key, value, strict=False)
    return apply_overrides(cfg, overrides)


def save_config(cfg: Mapping[str, Any], path: "str | os.PathLike") -> None:
    """Write the merged config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> List[Tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every setting that differs, except :data:`RESUMABLE_KEYS`."""
    changes: List[Tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(config_changes(a, b, f"{prefix}{key}."))
        elif a != b and f"{prefix}{key}" not in RESUMABLE_KEYS:
            changes.append((f"{prefix}{key}", a, b))
    return changes


def check_resumable(checkpoint_config: Mapping[str, Any], cfg: Mapping[str, Any], path: "str | os.PathLike",
                    allow_changes: bool = False) -> List[Tuple[str, Any, Any]]:
    """Refuse to resume the checkpoint at ``path`` under a config other than the one it was written with.

    Resuming silently with another recipe leaves a run that no config reproduces, so a difference is an error
    unless ``allow_changes`` (``train.resume_with_changes``). Returns the differences.

    Raises:
        ConfigMismatchError: the configs differ and ``allow_changes`` is false.
    """
    changes = config_changes(checkpoint_config or {}, cfg)
    if changes and not allow_changes:
        listing = "; ".join(f"{key} = {new!r} (checkpoint: {old!r})" for key, old, new in changes)
        raise ConfigMismatchError(
            f"{path} was written with a different config: {listing}. Use a new --output for a new run, or "
            "pass --set train.resume_with_changes=true to continue this one under the new settings")
    return changes


def write_run_config(cfg: Mapping[str, Any], output: "str | os.PathLike") -> Path:
    """Write ``<output>/config.yaml`` for a run, refusing when the folder already holds a different run.

    Called before the first file of a run is written (checkpoints, TensorBoard, metrics), so that a command
    pointed at another run's folder by mistake is refused with that folder left byte-identical. Rerunning the
    same command (to resume, or to finish an interrupted run) passes, as do the settings in
    :data:`RESUMABLE_KEYS`; ``train.resume_with_changes`` lets a user continue a run under a changed config.

    Raises:
        ConfigMismatchError: ``config.yaml`` exists and differs from ``cfg``.
    """
    path = Path(output) / "config.yaml"
    if path.is_file():
        try:
            previous = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigMismatchError(f"{path}: the config of an earlier run in this folder is not valid YAML ({err}); "
                                      "use a new --output") from None
        allow = bool((cfg.get("train") or {}).get("resume_with_changes")) if isinstance(cfg.get("train"), Mapping) \
            else False
        changes = config_changes(previous, cfg)
        if changes and not allow:
            listing = "; ".join(f"{key} = {new!r} (earlier run: {old!r})" for key, old, new in changes[:6])
            more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
            raise ConfigMismatchError(
                f"{Path(output)} holds another run ({listing}{more}); nothing was written. Use a new --output, or "
                "pass --set train.resume_with_changes=true to continue that run under the new settings")
    save_config(cfg, path)
    return path
