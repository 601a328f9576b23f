"""CPU intra-op thread count for training: timed, not guessed (``train.threads: auto``)."""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

__all__ = ["fastest_cpu_threads", "ThreadChooser"]

log = logging.getLogger(__name__)


def fastest_cpu_threads(max_threads: Optional[int] = None, trials: int = 3,
                        dtype: Optional[torch.dtype] = None) -> int:
    """The faster of 1 and ``max_threads`` (default: torch's current setting) intra-op threads for a short
    ViT-like CPU workload (matmuls, GELU, reductions in ``dtype``), timed alternately.

    On a machine whose cores are shared with other busy jobs, OpenMP threads stall at the end of every parallel
    op until their descheduled siblings catch up; there one thread ran a whole DINO step up to 3x faster than
    two, while on idle cores two threads are faster. Leaves torch's setting as it found it.

    Args:
        dtype: The dtype training computes in (the autocast dtype; ``None`` means fp32). It must be the one
            timed: on a CPU without native bf16 (AVX2 only) a bf16 matmul takes a slow path ~30x longer than
            fp32 that does not scale with threads, so a bf16 probe picked 1 thread for fp32 training that ran
            2x faster on 2 idle cores.
    """
    import torch.nn.functional as F

    max_threads = int(max_threads or torch.get_num_threads())
    if max_threads <= 1:
        return 1
    before = torch.get_num_threads()
    a = torch.randn(1024, 192).to(dtype or torch.float32)
    b = torch.randn(192, 768).to(dtype or torch.float32)

    def workload() -> None:
        for _ in range(12):
            F.gelu(torch.mm(a, b)).sum()

    best = {1: float("inf"), max_threads: float("inf")}
    try:
        for trial in range(trials + 1):
            for n in ((1, max_threads) if trial % 2 == 0 else (max_threads, 1)):
                torch.set_num_threads(n)
                start = time.perf_counter()
                workload()
                if trial:  # the first round warms up
                    best[n] = min(best[n], time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return max_threads if best[max_threads] < 0.9 * best[1] else 1


class ThreadChooser:
    """``train.threads`` on the CPU: ``auto`` picks 1 or all cores by a short timing in the run's compute dtype
    (:func:`fastest_cpu_threads`), an integer sets it, null leaves torch's default.

    One timing at start-up can be fooled by a short burst of other work (a test run starting beside a training
    picked 1 thread, 3.4 s/step instead of 2.0 s/step for the whole run), so a training loop calls
    :meth:`recheck` at its validation points and ``auto`` times again, with all cores still a candidate.

    The count a run sets stays in torch's process-wide setting; :meth:`restore` (or leaving a ``with`` block)
    puts back the count found at construction, so that a second run in the same process (a notebook, a test
    session) does not start from, and cap ``auto`` at, the 1 thread its predecessor chose.

    Args:
        setting: The ``train.threads`` value.
        device: The run's device (nothing is done off the CPU).
        amp_dtype: The autocast dtype (``None``: fp32); the timing runs in it.
    """

    def __init__(self, setting: Any, device: torch.device, amp_dtype: Optional[torch.dtype]) -> None:
        self.active = bool(setting) and device.type == "cpu"
        self.auto = self.active and str(setting).lower() == "auto"
        self.setting, self.amp_dtype = setting, amp_dtype
        self.found = self.max_threads = torch.get_num_threads()

    def probe(self) -> int:
        """Time 1 against all the cores the run started with (looked up at call time: tests script it)."""
        return fastest_cpu_threads(self.max_threads, dtype=self.amp_dtype)

    def apply(self) -> Optional[int]:
        """Set the thread count at start-up; returns it (``None`` where nothing is set)."""
        if not self.active:
            return None
        n = self.probe() if self.auto else int(self.setting)
        torch.set_num_threads(n)
        log.info("CPU threads: %d", n)
        return n

    def recheck(self) -> Optional[int]:
        """``auto`` only: time again and switch if the other count is now the faster; returns the count set."""
        if not self.auto:
            return None
        n = self.probe()
        if n != torch.get_num_threads():
            log.info("CPU threads: %d -> %d (timed again)", torch.get_num_threads(), n)
            torch.set_num_threads(n)
        return n

    def restore(self) -> None:
        """Put back torch's thread count as found at construction (a no-op where nothing was set)."""
        if self.active and torch.get_num_threads() != self.found:
            torch.set_num_threads(self.found)

    def __enter__(self) -> "ThreadChooser":
        self.apply()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
