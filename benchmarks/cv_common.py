"""What the cross-validation benchmarks (``finetune_cv.py``, ``probe_cv.py``) share: how a ``--variant`` is
written and which role each fold plays in one round."""

import argparse
from typing import Callable, Dict, List, Optional, Tuple


def parse_variant(text: str, check_key: Optional[Callable[[str], Optional[str]]] = None) -> Tuple[str, List[str]]:
    """``NAME=KEY=VALUE KEY=VALUE ...`` -> ``(NAME, ["KEY=VALUE", ...])``; ``NAME=`` alone: no overrides.

    Args:
        text: The ``--variant`` argument.
        check_key: Returns why a key may not be overridden (``None``: it may); the script's own restriction.

    Raises:
        argparse.ArgumentTypeError: no name, or a key ``check_key`` refuses (the message quotes the argument).
    """
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=KEY=VALUE ... (NAME= alone: the base)")
    overrides = rest.split()
    for item in overrides:
        key, has_value, _ = item.partition("=")
        if not has_value:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not KEY=VALUE")
        problem = check_key(key) if check_key else None
        if problem:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {problem}")
    return name, overrides


def fold_role(fold: int, k: int, folds: int) -> str:
    """Role of fold ``fold`` in round ``k``: fold ``k`` is scored (``test``), the next one chooses the epoch and
    the other settings (``val``: choosing them on the scored fold would favour settings with a noisy validation
    curve), the rest train."""
    return {k: "test", (k + 1) % folds: "val"}.get(fold, "train")


def fold_roles(group_fold: Dict[str, int], k: int) -> Dict[str, str]:
    """:func:`fold_role` of every group (patient) in round ``k`` of ``max(fold) + 1`` folds."""
    folds = max(group_fold.values()) + 1
    return {group: fold_role(f, k, folds) for group, f in group_fold.items()}
