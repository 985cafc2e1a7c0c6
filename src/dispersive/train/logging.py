"""Training logs: ``RUN_DIR/metrics.jsonl`` (one JSON object per logged step), TensorBoard, tqdm.

Only rank 0 logs; other ranks get a logger whose methods do nothing, so the loop has no
``if rank == 0`` around every call.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dispersive.atomic import atomic_write
from dispersive.train.rundir import METRICS_FILE, TB_DIR

__all__ = ["MetricsLogger", "read_metrics", "truncate_metrics"]


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # 0-d tensors / numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible instead of failing
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of ``RUN_DIR/metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run re-logs the steps after its checkpoint)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [r for r in read_metrics(run_dir) if int(r.get("step", 0)) <= step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))


class MetricsLogger:
    """metrics.jsonl + TensorBoard + a tqdm progress bar.

    Args:
        run_dir: the run directory (``metrics.jsonl`` and ``tb/`` are created in it).
        enabled: False on ranks other than 0: every method is a no-op.
        total_steps: length of the progress bar.
        initial_step: where the bar starts (resume).
        tensorboard: write TensorBoard event files (if the package is installed).
        progress: show a tqdm bar (on stderr).
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        total_steps: int = 0,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)  # line-buffered
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra; metrics.jsonl is enough
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=initial_step)
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(
                    total=total_steps,
                    initial=initial_step,
                    unit="step",
                    dynamic_ncols=True,
                    file=sys.stderr,
                    mininterval=1.0,
                )

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one record (must contain ``step``) to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        rec = _jsonable(dict(record))
        self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            step = int(rec["step"])
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def progress(self, n: int = 1, postfix: Mapping[str, Any] | None = None) -> None:
        """Advance the bar by ``n`` steps and optionally show the latest values."""
        if self._bar is None:
            return
        if postfix is not None:
            self._bar.set_postfix(
                {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                refresh=False,
            )
        self._bar.update(n)

    def write(self, msg: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None
