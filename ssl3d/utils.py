"""Small shared helpers: the bad-input error, atomic writes and nnU-Net path variables."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


class BadInputError(Exception):
    """A problem with a user's input file; reported as one line naming the file, never as a traceback."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem


class BadInputs(Exception):
    """Several bad inputs at once; each line names a file and its problem."""

    def __init__(self, lines: list[str], hint: str = "nothing was written (use --skip-bad to skip them)"):
        self.lines = lines
        self.hint = hint
        super().__init__("\n".join(lines))


# nnU-Net's own seed (its cross-validation split); every seeded choice in ssl3d derives from a seed like this
DEFAULT_SEED = 12345


def unwrap_network(network: Any) -> Any:
    """The plain module behind DDP and ``torch.compile`` wrappers (what owns the state_dict keys)."""
    net = getattr(network, "module", network) if type(network).__name__ == "DistributedDataParallel" else network
    return getattr(net, "_orig_mod", net)


def atomic_write(path: str | os.PathLike, write_fn, mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp_{path.name}.", dir=path.parent)
    try:
        # text files are UTF-8 whatever the locale (an ASCII locale cannot write the reports' ± and Δ)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; match what a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out, write a matplotlib figure as PNG under a temporary name, rename, and always close it."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        plt.close(fig)
    return Path(path)


def _json_default(o: Any):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(Path(path), lambda f: json.dump(obj, f, indent=2, default=_json_default, ensure_ascii=False), "w")


def write_pickle(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(Path(path), lambda f: pickle.dump(obj, f), "wb")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def env_dir(name: str) -> Path | None:
    """Value of an nnU-Net path variable (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) or None."""
    value = os.environ.get(name)
    return Path(value) if value else None


def as_triple(v: "int | Sequence[int]") -> tuple[int, int, int]:
    """An int or three ints (per-axis kernel, stride, cell...) as a tuple of three ints."""
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"expected an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def guarded_case(case_id: str, first_file: Any, action: str, fn: Callable, *args: Any) -> tuple[str, Any, str | None]:
    """``(case_id, fn(*args), None)``, or ``(case_id, None, one-line error)`` for bad input / out of memory, so one
    bad case in a worker pool is reported instead of killing the run."""
    try:
        return case_id, fn(*args), None
    except BadInputError as e:
        return case_id, None, e.line()
    except MemoryError:
        return case_id, None, f"{first_file}: out of memory while {action}"


def die_with_parent(parent: int, sig: int = 15) -> None:
    """Have the kernel send ``sig`` (default SIGTERM) to this process when its parent dies, also by SIGKILL
    (``PR_SET_PDEATHSIG``, Linux); when the parent already died, send it now."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


class DiesWithParent:
    """Wraps a batch iterator handed to data-loader worker processes (batchgenerators' augmenters fork them and
    never check their parent): the first batch drawn in a worker arms ``die_with_parent``, so a ``kill -9`` of the
    trainer ends its workers instead of leaving them orphaned."""

    def __init__(self, loader: Any):
        self._loader, self._owner, self._armed = loader, os.getpid(), os.getpid()

    def __iter__(self) -> "DiesWithParent":
        return self

    def __next__(self) -> Any:
        if os.getpid() != self._armed:  # first batch in a forked worker
            self._armed = os.getpid()
            die_with_parent(self._owner, 9)
        return next(self._loader)

    def __getattr__(self, name: str) -> Any:  # set_thread_id, indices, ... of the wrapped loader
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._loader, name)


def map_cases(worker: Callable[[Any], Any], jobs: Sequence[Any], num_processes: int = 1, desc: str = "",
              progress: bool = True) -> list[Any]:
    """``worker`` over ``jobs`` in input order, in a fork pool when ``num_processes`` > 1, with a tqdm bar."""
    from tqdm import tqdm

    outs = []
    with tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress) as bar:
        if num_processes > 1 and len(jobs) > 1:
            with mp.get_context("fork").Pool(min(num_processes, len(jobs))) as pool:
                for out in pool.imap(worker, jobs):
                    bar.update(1)
                    outs.append(out)
        else:
            for job in jobs:
                outs.append(worker(job))
                bar.update(1)
    return outs


def read_json_input(path: str | os.PathLike, what: str = "file") -> Any:
    """``read_json`` for a file the user gave or an earlier run wrote: missing or broken -> one-line BadInputError."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"missing ({what})")
    try:
        return read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(path, f"broken JSON ({what}): {e}") from None
    except OSError as e:
        raise BadInputError(path, f"unreadable ({what}): {e.strerror or e}") from None
