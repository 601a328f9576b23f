"""The error boundary of every command-line entry point.

A user's mistake (a bad config value, a missing or corrupt file, an output folder that is a file) ends with one
line on stderr naming the file or key, and a non-zero exit status. A traceback is shown only for what is our own
bug, or for everything with ``--debug`` (or ``VISIONFM_DEBUG=1``).

Library errors that are the user's to fix derive from :class:`VisionFMError`; a few standard exceptions that
only come from the user's file system (a missing file, a file where a folder is expected, a permission) are
treated the same way.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, List, Optional, Sequence

__all__ = ["VisionFMError", "UserInputError", "NonFiniteLossError", "UnsafeCheckpointError", "USER_OS_ERRORS", "run_cli"]


class VisionFMError(Exception):
    """Base of the errors a user can fix from the message alone (config, input files, weights, output)."""


class UserInputError(VisionFMError, ValueError):
    """A command-line value that cannot be used; the message names the flag or file."""


class NonFiniteLossError(VisionFMError, RuntimeError):
    """A training loss became NaN or infinite (every trainer raises this one type; the message says what to
    change)."""


class UnsafeCheckpointError(VisionFMError, RuntimeError):
    """A checkpoint that cannot be loaded with ``weights_only=True`` (a pickle that needs more than tensors)."""


#: Standard exceptions that, at the top of a command, are the user's file system and not our bug.
USER_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

#: Exit status of an error the user can fix (argparse uses 2 for its usage errors).
USER_ERROR_STATUS = 1


def _user_error(err: BaseException) -> bool:
    if isinstance(err, (VisionFMError, *USER_OS_ERRORS)):
        return True
    # safetensors' SafetensorError does not derive from our base; the loaders wrap it, this is the backstop.
    return type(err).__name__ == "SafetensorError"


def _close_process_group(wait: bool) -> None:
    """Destroy a ``torchrun`` process group before the interpreter exits: a gloo group left alive at exit can abort
    a rank in its threads' destructors ("terminate called without an active exception"). ``wait``: meet the
    other ranks first (only where every rank finished the command). Looked up in ``sys.modules`` so that this
    module never imports torch itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def run_cli(main: Callable[[Optional[List[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's ``main(argv)`` inside the error boundary; returns the exit status.

    ``--debug`` anywhere in ``argv`` (removed before ``main`` sees it) shows the traceback of every error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("VISIONFM_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        status = int(main(args) or 0)
        _close_process_group(wait=True)
        return status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the boundary decides between one line and a traceback
        if not _user_error(err):
            raise  # our own bug: the traceback is the report
        if debug:
            traceback.print_exc()
        message = str(err) or type(err).__name__
        if isinstance(err, USER_OS_ERRORS) and getattr(err, "filename", None) and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS
