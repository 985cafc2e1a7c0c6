"""Skipping steps with a non-finite loss or gradient, without waiting for an accelerator.

The training loop skips an optimizer step whose gradient norm is not finite and stops after
``train.max_nonfinite`` such steps in a row. On the CPU it reads the norm every step (free
there). On an accelerator that read would wait for the device's queue every step, so the next
step's kernels could not be queued while this one runs. :class:`DeferredGuard` keeps the
decision on the device instead:

- the optimizer is fused AdamW, which takes the decision as ``found_inf`` (the mechanism of
  ``torch.amp.GradScaler``): on a non-finite step it leaves parameters, moments and step count
  as they were;
- the EMA update is weighted by it (``lerp_`` with weight 0 leaves the EMA exactly unchanged);
- the counts live in device tensors and are read by :meth:`DeferredGuard.settle` on logging
  and checkpoint steps (values the loop reads anyway) and every ``max_in_a_row`` steps, so a
  run of bad steps is stopped at most ``max_in_a_row`` steps late, all of them skipped.

The skip itself is exact: parameters, optimizer state and EMA after a skipped step equal those
of the host-side skip (tests/test_train_loop.py, the guard forced onto the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dispersive.errors import UserError


def stop_message(step: int, in_a_row: int, run_dir) -> str:
    """The error after ``in_a_row`` non-finite steps in a row (both guards)."""
    return (
        f"training stopped at step {step}: {in_a_row} steps in a row had a "
        "non-finite loss or gradient; lower optim.lr, set optim.grad_clip (e.g. "
        "1.0) or use train.precision = 'fp32', then start again or resume from "
        f"the last checkpoint with --resume {run_dir} --set ..."
    )


class DeferredGuard:
    """Device-side bookkeeping of skipped steps (see the module docstring).

    Args:
        max_in_a_row: ``train.max_nonfinite``.
        device: the training device (where the gradient norm lives).
    """

    def __init__(self, max_in_a_row: int, device: torch.device) -> None:
        self.max_in_a_row = int(max_in_a_row)
        # [steps skipped in a row, skipped since the last settle, last skipped step]
        self._counts = torch.zeros(3, dtype=torch.int64, device=device)

    def record(self, grad_norm: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """``(finite, found_inf)`` of this step: a bool tensor and its float32 complement
        (fused AdamW's ``found_inf``), both 0-dim on the device. Nothing is read back."""
        finite = torch.isfinite(grad_norm)
        bad = (~finite).to(torch.int64)
        c = self._counts
        c[0] = (c[0] + 1) * bad  # reset by a finite step
        c[1] += bad
        c[2] = torch.where(finite, c[2], step)
        return finite, bad.to(torch.float32)

    def settle(self, step: int, write, run_dir) -> int:
        """Read the counts (one host sync), say what was skipped since the last call, and raise
        after ``max_in_a_row`` non-finite steps in a row. Returns the number newly skipped."""
        in_a_row, skipped, last = (int(v) for v in self._counts.tolist())
        if skipped:
            write(
                f"steps up to {step}: {skipped} with a non-finite loss or gradient skipped "
                f"(the last at step {last}), {min(in_a_row, self.max_in_a_row)}/"
                f"{self.max_in_a_row} in a row"
            )
            self._counts[1] = 0
        if in_a_row >= self.max_in_a_row:
            raise UserError(stop_message(step, in_a_row, run_dir))
        return skipped
