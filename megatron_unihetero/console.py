"""What a process prints, and where the warnings of the libraries under it go.

megatron-core, torch and DeepSpeed warn about things a person cannot act on in a run (optional
accelerators that are absent, their own deprecations): each process repeats them. A run's
console carries this package's lines only; the warnings go, with this package's ``logging``
records (``megatron_unihetero.*`` loggers, INFO and up), to the run's log file, and
``verbose`` (``logging.verbose``, the tools' ``--verbose``) shows them on the console as well.

Warnings raised while the heavy modules are imported come before a run has read its config
(before it knows the file): :func:`held_warnings` records them and :class:`RunLog` writes them
into the file once it is opened. Both are scoped (``warnings.catch_warnings``): nothing of
``warnings`` or ``logging`` is left changed after the block, and warning filters (``-W``,
``PYTHONWARNINGS``) apply as always.

    with console.held_warnings() as import_warnings:
        import megatron.core ...
    ...
    with console.RunLog(import_warnings) as log:
        cfg = ...
        log.open(os.path.join(cfg.logging.dir, "run.log"), verbose=cfg.logging.verbose)
        ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterable, Iterator, List, Optional

PACKAGE_LOGGER = "megatron_unihetero"
WARNINGS_LOGGER = "py.warnings"  # the name logging.captureWarnings uses
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_file_name(rank: int, name: str = "run.log") -> str:
    """``run.log`` for global rank 0, ``run.rank{R}.log`` for the others (each process its own)."""
    if rank == 0:
        return name
    stem, ext = os.path.splitext(name)
    return f"{stem}.rank{rank}{ext}"


def launcher_rank() -> int:
    """This process's global rank as its launcher set it (0 without a launcher), known before
    the process group is joined."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def held_warnings() -> Iterator[List[warnings.WarningMessage]]:
    """Record the warnings raised in the block (an import) instead of printing them; hand the
    list to :class:`RunLog`."""
    with warnings.catch_warnings(record=True) as caught:
        yield caught


def _warning_record(message: warnings.WarningMessage) -> logging.LogRecord:
    text = warnings.formatwarning(message.message, message.category, message.filename,
                                  message.lineno, message.line).rstrip("\n")
    return logging.LogRecord(WARNINGS_LOGGER, logging.WARNING, message.filename, message.lineno,
                             text, None, None)


class RunLog:
    """This process's warnings and this package's log records, into one file.

    A context manager: inside, every warning (that the filters let through) is held until
    :meth:`open` names the file, then written there; with ``verbose`` it is printed on stderr
    as well. This package's loggers write INFO and up to the file; their WARNING and up (and
    with ``verbose`` their INFO) still reach the console, unless the application configured
    ``logging`` itself (a root handler), which then prints them as it always did. On exit the
    file is closed and ``warnings`` / ``logging`` are as they were; warnings never written
    (the block ended before :meth:`open`) are dropped.
    """

    def __init__(self, held: Iterable[warnings.WarningMessage] = ()):
        self._pending: List[logging.LogRecord] = [_warning_record(m) for m in held]
        self.path: Optional[str] = None
        self.verbose = False
        self._file: Optional[logging.Handler] = None
        self._console: Optional[logging.Handler] = None
        self._catch = None
        self._package_level: Optional[int] = None

    # -- the block -----------------------------------------------------------------------------
    def __enter__(self) -> "RunLog":
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.showwarning = self._show
        return self

    def __exit__(self, *exc) -> bool:
        try:
            self._detach()
        finally:
            self._catch.__exit__(*exc)
        return False

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        record = _warning_record(warnings.WarningMessage(message, category, filename, lineno,
                                                         file, line))
        if self._file is None:
            self._pending.append(record)
            return
        self._file.handle(record)
        if self.verbose:
            self._console.handle(record)

    # -- the file ------------------------------------------------------------------------------
    def open(self, path: str, verbose: bool = False) -> None:
        """Write to ``path`` (appending; its folder is made) from now on, the held warnings
        first. ``verbose``: print the warnings (and this package's INFO lines) on stderr too."""
        if self._file is not None:
            raise RuntimeError(f"the run log is already open ({self.path})")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.verbose = path, verbose
        self._file = logging.FileHandler(path, encoding="utf-8")
        self._file.setFormatter(logging.Formatter(FILE_FORMAT))
        self._console = logging.StreamHandler(sys.stderr)
        self._console.setFormatter(logging.Formatter("%(message)s"))
        package = logging.getLogger(PACKAGE_LOGGER)
        package.addHandler(self._file)
        if package.level == logging.NOTSET:  # the root's WARNING would drop the INFO lines
            self._package_level = package.level
            package.setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            # Nobody else prints this package's records: once the file handler is there,
            # logging's last resort (WARNING and up on stderr) would no longer fire.
            self._console.setLevel(logging.INFO if verbose else logging.WARNING)
            package.addHandler(self._console)
        for record in self._pending:
            self._file.handle(record)
            if verbose:
                self._console.handle(record)
        self._pending = []

    def _detach(self) -> None:
        if self._file is None:
            return
        package = logging.getLogger(PACKAGE_LOGGER)
        package.removeHandler(self._file)
        package.removeHandler(self._console)
        if self._package_level is not None:
            package.setLevel(self._package_level)
            self._package_level = None
        self._file.close()
        self._file = None
