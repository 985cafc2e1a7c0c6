"""Dispersive Loss (Wang & He 2025, Table 1) and its contrastive counterparts.

Everything here is a batch regulariser on flattened activations ``z`` of shape (B, ...): each
sample is flattened to a vector of ``dim`` numbers and the functions return a scalar.

Definitions (``dim`` = features per sample, ``N_pairs`` = B^2 with the diagonal, B(B-1) without):

- distance, l2 variants:  ``dist_ij = ||z_i - z_j||^2 / dim`` (``/ dim`` only when
  ``normalize_by_dim``; the authors' PyTorch code divides by ``dim``), computed from batch-centred
  features through the B x B Gram matrix; ``dist_ii = 0`` exactly.
- dissimilarity, cosine:  ``dist_ij = -cos(z_i, z_j)``, ``dist_ii = -1`` exactly
  (``normalize_by_dim`` does not apply: cosine is already scale free).
- ``infonce_*``:  ``log( (1 / N_pairs) sum_{i,j} exp(-dist_ij / tau) )`` (paper Eq. 6), computed as
  ``logsumexp - log N_pairs``. With the diagonal it lies in ``[-log B, 0]``: 0 at collapse.
- ``hinge``:  ``(1 / N_pairs) sum_{i,j} max(0, margin - dist_ij)^2`` with the l2 distance.
- ``covariance``:  ``sum_{m,n} Cov_mn^2`` (divided by ``dim^2``, i.e. the mean over the D x D
  entries, when ``normalize_by_dim``). ``Cov = Zn^T Zn / (B - 1)`` where ``Zn`` standardises each
  feature over the batch: ``Zn[:, m] = (z[:, m] - mean_m) / sqrt(var_m + 1e-5 * mean_k var_k)``
  (unbiased ``var``; the small relative ``eps`` keeps constant features finite and the loss
  invariant to a global rescaling). So ``Cov_mm ~= 1`` is the "constant diagonal" of the paper.
  The D x D matrix is never formed: ``sum Cov^2 = ||Zn Zn^T||_F^2 / (B - 1)^2``. With the mean
  normalisation the value lies in ``[~1 / min(B - 1, dim), ~1]`` (Cov has rank <= B - 1).
  ``include_diagonal`` (a statement about sample pairs) does not apply to this variant.

Numerics: the computation runs in float32 whatever the input dtype or autocast state (float64
inputs are computed in float64, which the gradient checks use; float32 is the minimum
precision). No D x D matrix and no B x B x D tensor is ever formed: the one O(B^2 D) step is the
Gram matrix of the centred features (one matmul for small z; for large z in column chunks so
that the centred, upcast copy never exists in full); its backward is one matmul (per chunk).
Near-duplicate pairs, whose Gram-form distance n_i + n_j - 2 G_ij would be mostly rounding,
get their distance and gradient from the differences z_i - z_j instead (exact duplicates: 0),
so values and gradients stay within ~1e-6 of float64 whatever the pairs (issue 12, item 3).
InfoNCE-l2 of small batches (B <= 8, or B <= 16 with dim <= 4096) takes its distances from
``torch.nn.functional.pdist`` instead (the differences of its few pairs, exact, and cheaper
there than the Gram path's fixed cost); its backward is pdist's own kernel, or on the CPU for
B = 4-8 and B(B-1)/2 * dim >= 262,144 one matmul with the pairs' Laplacian when no pair is
near enough for its rounding to matter (1.05-1.15x faster on the whole loss there, see
docs/benchmarks.md).
Both InfoNCE-l2 paths are fused autograd Functions with analytic backwards: the loss is often
called per group of a few samples, where the cost of separate small operations dominates.
Non-finite input is detected from the distances or the loss (no separate pass over z) and
named with a clear error.

Host syncs (reading a value back from an accelerator waits for its queue): on the CPU the
checks above read one scalar per call. Off the CPU the checks that exist only for the error
do not read anything back: the pdist paths (InfoNCE-l2 of small batches, also grouped) and
the covariance, cosine and contrastive losses then return NaN for non-finite input instead of
raising (the training loop's finiteness guard on the gradient norm, a value it reads anyway,
skips such a step, as it does after the error). What remains per call off the CPU: the
Gram path of InfoNCE-l2 and hinge counts its near-duplicate pairs (one read, which also
catches non-finite input there and raises), the cosine variant asks whether it has any (one
read), and ``scope="global"`` exchanges batch sizes; each finds which pairs need exact
differences, a data-dependent shape.

torch.compile: the eager code branches on data (near-duplicate pairs, the non-finite check),
which would break the graph. Under compilation (``torch.compiler.is_compiling()``) every public
entry point calls one custom operator, ``dispersive::loss_and_grads``, that runs the eager code
inside and returns the loss with its gradient (computed in the same call when z requires grad;
first-order only). So a function calling the loss compiles with ``fullgraph=True`` and gives
the eager values, gradients (up to the rounding of scaling them by the incoming gradient) and
``NonFiniteInputError`` (raised from inside the operator when it runs). The operator is opaque
to the compiler: nothing of the loss is fused or reordered.

Scopes: ``scope="local"`` (default, the authors' semantics) uses this process's batch.
``scope="global"`` gathers z from every ``torch.distributed`` rank with a differentiable
all_gather; see :func:`dispersive_loss` for the exact gradient relationship. Without an
initialised process group (or with one rank) both are the same.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable as _once_differentiable

__all__ = [
    "VARIANTS",
    "SCOPES",
    "DispersiveLoss",
    "dispersive_loss",
    "contrastive_loss",
    "dispersion_stats",
    "distance_stats",
    "NonFiniteInputError",
]

VARIANTS: tuple[str, ...] = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
SCOPES: tuple[str, ...] = ("local", "global")

# Elements per column chunk of the Gram computation (16 MiB in float32): bounds the transient
# centred/upcast copy while keeping each matmul large enough to run at full speed.
_CHUNK_ELEMS = 1 << 22
# Up to this many elements z is centred/upcast in full and multiplied in one call (<= 1 MiB in
# float32): below it the chunk bookkeeping costs more than the copy; above it the chunks were
# measured faster too (they stay in cache) and keep the peak memory down.
_SMALL_ELEMS = 1 << 18
# A pair is near-duplicate when d_ij <= _NEAR * (n_i + n_j) (l2; n_i the centred squared norm)
# or 1 - cos_ij <= _NEAR (cosine): its distance and gradient are then computed from z_i - z_j,
# since the Gram form's rounding (~eps * (n_i + n_j)) is no longer small against d_ij.
_NEAR = 0.25
# InfoNCE-l2 of batches up to this size uses torch's pdist (exact distances from z_i - z_j):
# for a few pairs it costs less than the Gram path's fixed overhead and skinny matmuls
# (measured with benchmarks/loss.py) ...
_PDIST_MAX_B = 8
_PDIST_MAX_DIM = 4096  # ... and batches up to twice that size with at most this many features
# For B = 4-8 and from this many pair-columns B(B-1)/2 * dim (B = 4 at D >= 65,536, B = 8 at
# D >= 16,384), the pdist path's backward on the CPU is one matmul with the pairs' Laplacian
# when no pair is near enough for its rounding to matter (see _pdist_laplacian): pdist's
# backward kernel (a loop over the pairs per column block, after zero-filling its output),
# whose cost grows with the pairs, costs more there, about 10% of the whole loss. Below it the
# Laplacian's fixed cost (a row norm, a small matmul) wins (interleaved A/B with
# benchmarks/loss.py's timing, docs/benchmarks.md). Smaller z and batches of 9-16 keep pdist's
# backward, so the Fashion-MNIST study's groups (16 x 3,136) compute bit for bit as before.
_LAPLACIAN_MIN_B = 4
_LAPLACIAN_NEAR = 1 / 64  # its near-pair criterion (see _pdist_laplacian)
_LAPLACIAN_MIN_WORK = 1 << 18
# The l2 backward on the chunked path multiplies the pairs' Laplacian by z itself instead of the
# centred z (equal in exact arithmetic: the Laplacian's rows sum to 0), saving a pass over z,
# while the batch mean's energy B |mu|^2 is at most this many times the centred energy
# trace(Gc): the matmul's rounding then grows by at most 1 + sqrt(16) = 5x, still ~1e-6 of the
# gradient. Trained SiT activations measured 1.4-5.7x (docs/benchmarks.md); a feature map far
# from the origin (a large common offset) keeps the centred backward.
_UNCENTRED_BACKWARD_MAX = 16.0
# At most this many columns per chunk: a float32 matmul accumulating over 300K columns in one
# call measured 1e-5 relative error in G; chunks of 16K columns summed in G measured 3e-7.
_CHUNK_COLS = 1 << 14
# At least this many chunks (when dim allows), so the chunk buffer stays <= 1/4 of z's size.
_MIN_CHUNKS = 4
# Relative variance floor of the covariance variant's per-feature standardisation.
_COV_EPS = 1e-5
# Norm floor for the cosine variant (as torch.nn.functional.normalize): zero rows stay finite.
_NORM_EPS = 1e-12
# dispersion_stats: a pair is "active" while its InfoNCE weight exp(-dist / tau) exceeds this.
_ACTIVE_THRESHOLD = 1e-3


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_options(variant: str, tau: float, margin: float, scope: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown dispersive loss variant {variant!r}; valid variants: {VARIANTS}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; valid scopes: {SCOPES}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0 (the temperature); got {tau!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a finite number > 0 (the hinge epsilon); got {margin!r}")


def _flatten(z: Tensor, name: str = "z") -> Tensor:
    """Check z's type and shape and flatten it to (B, dim).

    Batch size and finiteness are checked after any gathering, on data every rank shares, so
    that all ranks raise together instead of leaving the others waiting in a collective.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...); got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor of activations; got dtype {z.dtype}. "
            f"Convert it with {name}.float()."
        )
    if z.ndim < 2:
        raise ValueError(
            f"{name} must have shape (B, ...) with the batch first (each sample is flattened to a "
            f"vector); got a {z.ndim}-D tensor of shape {tuple(z.shape)}. Pass the activations "
            f"of the whole batch, e.g. (B, tokens, hidden) or (B, C, H, W)."
        )
    if z.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(z.shape)}); it needs B >= 2 samples")
    return z if z.ndim == 2 else z.reshape(z.shape[0], -1)


class NonFiniteInputError(ValueError):
    """The activations given to a loss contain NaN or Inf (a ``ValueError``; callers that must
    keep going, such as the training loop's NaN term on a diverged step, catch this one)."""


def _check_finite(z: Tensor, name: str) -> None:
    # Chunked sums instead of an elementwise mask (no full-size temporary, one host sync): any
    # NaN/Inf makes a sum non-finite. Half types are summed in float32 (an fp16 sum overflows at
    # 65504); a non-finite total is confirmed elementwise before raising, so a legitimate
    # overflow of the sum costs time, never a false error.
    zd = z.detach().reshape(z.shape[0], -1)
    acc = torch.float32 if zd.element_size() < 4 else zd.dtype
    total = sum(zd[:, s:e].sum(dtype=acc) for s, e in _column_chunks(*zd.shape))
    if torch.isfinite(total):
        return
    bad = ~torch.isfinite(zd)
    if bad.any():
        n_nan = int(torch.isnan(zd).sum())
        first = int(bad.any(dim=1).nonzero()[0, 0])
        raise NonFiniteInputError(
            f"{name} contains non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} Inf; "
            f"first in sample {first} of the batch the loss sees); the loss needs finite "
            f"activations. The model has probably diverged upstream: lower the learning rate "
            f"or enable gradient clipping."
        )


def _check_batch(b: int, scope: str) -> None:
    if b < 2:
        where = "in total over all ranks" if scope == "global" else "per device"
        raise ValueError(
            f"the dispersive loss needs at least two samples {where} (got B={b}): it compares "
            f"samples within the batch, and with one sample the only pair is the sample with "
            f"itself, so the loss is a constant with zero gradient. Increase the per-device "
            f"batch size (or use scope='global' to gather samples from all ranks)."
        )


def _compute_dtype(z: Tensor) -> torch.dtype:
    # float32 is the minimum precision (pdist/logsumexp in bf16 lose the signal); float64
    # inputs stay float64 so that gradcheck can verify the gradients.
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    # Entering autocast costs more than the whole loss on small batches: only when it is on.
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(device_type=kind, enabled=False)
    return contextlib.nullcontext()


def _host_checks(device: torch.device) -> bool:
    """Whether a finiteness check may read a value back to the host: on the CPU that is
    free; on an accelerator it waits for the queue to drain (a host sync per call). There the
    checks that exist only for the error are folded into the returned value instead (NaN for
    non-finite input; the training loop's guard on the gradient norm, a value it reads anyway,
    then skips the step)."""
    return device.type == "cpu"


def _nan_if_nonfinite(loss: Tensor, probe: Tensor) -> Tensor:
    # probe.sum() * 0 is NaN when the probe holds a NaN or an Inf, else exactly 0: no sync.
    return loss + probe.sum() * 0


def _checked(loss: Tensor, *named: tuple[Tensor, str]) -> Tensor:
    # Non-finite input makes the loss non-finite (NaN/Inf reach every Gram entry through the
    # batch mean or the norms), so checking the scalar replaces a pass over z; the inputs are
    # then searched to name the problem (a finite overflow of the loss is not refused). Off
    # the CPU the non-finite loss is returned as it is (no host sync, see _host_checks).
    if not _host_checks(loss.device):
        return loss
    if not math.isfinite(loss.item()):
        for t, name in named:
            _check_finite(t, name)
    return loss


def _first_order(backward):
    """``once_differentiable`` without its cost on the usual path: a first-order backward runs
    with grad mode off, and then the body is called directly (torch's wrapper would enter
    ``no_grad`` again, ~10 us per call, as much as a small loss's backward kernel). Under
    ``create_graph=True`` torch's wrapper takes over (double backward raises its error)."""
    guarded = _once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        return guarded(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    return wrapper


def _eye(b: int, device: torch.device) -> Tensor:
    return torch.eye(b, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------------
# The Gram matrix: the one O(B^2 dim) step, with a hand-written one-matmul backward
# --------------------------------------------------------------------------------------------


def _column_chunks(b: int, dim: int) -> list[tuple[int, int]]:
    if b * dim <= _SMALL_ELEMS:
        return [(0, dim)]  # small z: one matmul; a bounded buffer would only add overhead
    width = max(1, min(_CHUNK_COLS, _CHUNK_ELEMS // max(b, 1), -(-dim // _MIN_CHUNKS)))
    return [(s, min(s + width, dim)) for s in range(0, dim, width)]


def _chunks(z: Tensor, mu: Tensor | None, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
    """Yield ``(s, e, z[:, s:e] - mu[s:e])`` in ``dtype`` (B, e - s), column chunk by chunk.

    The centred/upcast chunk lives in one reused buffer (fresh allocations of this size cost
    page faults), so each chunk must be consumed before the next is requested. Without
    centring or upcast the chunk is a strided view of z, which BLAS reads directly.
    """
    b, dim = z.shape
    chunks = _column_chunks(b, dim)
    if mu is None and z.dtype == dtype:
        for s, e in chunks:
            yield s, e, z[:, s:e]
        return
    flat = torch.empty(b * (chunks[0][1] - chunks[0][0]), dtype=dtype, device=z.device)
    for s, e in chunks:
        blk = flat[: b * (e - s)].view(b, e - s)
        if mu is None:
            blk.copy_(z[:, s:e])
        else:
            torch.sub(z[:, s:e], mu[s:e], out=blk)
        yield s, e, blk


def _gram(z: Tensor, center: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """G = Zc Zc^T in ``dtype`` (B, B), Zc = z - (batch mean if ``center``); no autograd.

    Returns ``(G, mu, zc)``: ``mu`` (dim,) the mean that was subtracted (None without centring)
    and ``zc`` the centred/upcast z when it was formed in full (small z), else None: the
    backward then re-centres z chunk by chunk (the copy never exists in full).
    """
    b, dim = z.shape
    if b * dim <= _SMALL_ELEMS:
        if not center:
            zc = z.to(dtype)
        elif z.dtype == dtype:
            zc = z - torch.mm(torch.full((1, b), 1 / b, dtype=dtype, device=z.device), z)
        else:
            zc = z - z.mean(dim=0, dtype=dtype)  # type promotion upcasts half inputs
        return torch.mm(zc, zc.t()), None, zc
    mu = z.mean(dim=0, dtype=dtype) if center else None
    g = torch.zeros((b, b), dtype=dtype, device=z.device)
    for _, _, blk in _chunks(z, mu, dtype):
        g.addmm_(blk, blk.T)
    return g, mu, None


def _gram_backward(q: Tensor, z: Tensor, mu: Tensor | None, zc: Tensor | None, dtype):
    """``q @ Zc`` (B, dim) in z's dtype, chunked like the forward when Zc was not kept."""
    if zc is not None:
        return torch.mm(q, zc).to(z.dtype)
    if mu is None and z.dtype == dtype:
        # Zc is z itself: one matmul (it sums over B only, so no chunks are needed for
        # accuracy), which spreads over threads better than one matmul per chunk.
        return torch.mm(q, z)
    grad = torch.empty_like(z, memory_format=torch.contiguous_format)
    for s, e, blk in _chunks(z, mu, dtype):
        if grad.dtype == dtype:
            torch.mm(q, blk, out=grad[:, s:e])
        else:
            grad[:, s:e] = q @ blk  # cast back to the input's (lower) precision
    return grad


class _Gram(torch.autograd.Function):
    """G = Zc Zc^T in ``dtype`` (B, B); Zc = z - mean over the batch if ``center`` else z.

    Backward: dL/dz = P (gG + gG^T) Zc with P = I - 11^T / B (the centring projection), one
    matmul (per chunk); only z, the (dim,) mean and, for small z, Zc are saved.
    """

    @staticmethod
    def forward(ctx, z: Tensor, center: bool, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        g, mu, zc = _gram(z, center, dtype)
        ctx.save_for_backward(z, mu, zc)
        ctx.dtype, ctx.center = dtype, center
        # BLAS need not return an exactly symmetric product; symmetrise.
        return 0.5 * (g + g.T)

    @staticmethod
    @_first_order
    def backward(ctx, grad_g: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        z, mu, zc = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        a = grad_g + grad_g.T  # dL/dZc = (gG + gG^T) Zc
        if ctx.center:
            a = a - a.mean(dim=0, keepdim=True)  # P a: the centring's backward (no-op uncentred)
        return _gram_backward(a, z, mu, zc, ctx.dtype), None, None


# --------------------------------------------------------------------------------------------
# Pairwise (dis)similarities with exact near-duplicate pairs
#
# From the Gram matrix, d_ij = n_i + n_j - 2 G_ij (n_i = G_ii) carries an absolute rounding
# error of ~eps * (n_i + n_j): harmless while d_ij is comparable to n_i + n_j, but it swamps
# the distance of near-duplicate pairs (and the matmul backward, sum_j w_ij (zc_i - zc_j)
# computed as w_ij zc_i - w_ij zc_j, loses their push-apart gradient the same way). The few
# pairs with d_ij <= _NEAR * (n_i + n_j) are recomputed from differences z_i - z_j (forward and
# backward), which are exact there; everything else stays on the Gram path.
# --------------------------------------------------------------------------------------------


def _near_pairs(near: Tensor) -> tuple[Tensor, Tensor]:
    near = near | near.T  # BLAS may round G_ij and G_ji differently
    i, j = near.triu(1).nonzero().unbind(1)
    return i, j


def _pair_rows(z: Tensor, i: Tensor, j: Tensor, dtype: torch.dtype) -> Iterator[tuple]:
    """Yield ``(s, e, z[i[s:e]], z[j[s:e]])`` in ``dtype``, a bounded number of pairs at a time."""
    step = max(1, _CHUNK_ELEMS // z.shape[1])
    for s in range(0, i.numel(), step):
        e = min(s + step, i.numel())
        yield s, e, z[i[s:e]].to(dtype), z[j[s:e]].to(dtype)


def _sq_dist_forward(z: Tensor, dtype: torch.dtype):
    """Squared l2 distances (B, B) (not divided by dim), exact 0 on the diagonal; no autograd.

    Returns ``(d, saved)``: the tensors the backward needs, ``(z, mu, zc, i, j)`` with
    ``(i, j)`` the exactly recomputed pairs (None when there are none) and ``mu`` the mean
    the backward centres with (None: no centring, see _UNCENTRED_BACKWARD_MAX). Raises the
    non-finite-input error (a NaN or Inf in z makes every diagonal entry NaN).
    """
    b = z.shape[0]
    g, mu, zc = _gram(z, True, dtype)
    n = g.diagonal()
    nn = n.unsqueeze(1) + n
    d = torch.add(nn, g, alpha=-2)  # d_ii = 2 n_i - 2 n_i = 0 exactly
    near = d <= torch.mul(nn, _NEAR)
    count = torch.count_nonzero(near)  # the diagonal is always in (0 <= 0); NaN never is
    if mu is None:
        count = int(count)
    else:
        # One read-back for both: the near pairs and whether the backward may skip centring.
        uncentred = b * torch.dot(mu, mu) <= _UNCENTRED_BACKWARD_MAX * n.sum()
        count, uncentred = torch.stack([count, uncentred.to(count.dtype)]).tolist()
        if uncentred:
            mu = None  # the backward multiplies by z (see _UNCENTRED_BACKWARD_MAX)
    i = j = None
    if count > b:
        i, j = _near_pairs(near)
        dp = torch.empty(i.numel(), dtype=dtype, device=z.device)
        for s, e, zi, zj in _pair_rows(z, i, j, dtype):
            dp[s:e] = (zi - zj).square_().sum(dim=1)
        d[i, j] = dp
        d[j, i] = dp
    elif count < b:
        _check_finite(z, "z")
    return d, (z, mu, zc, i, j)


def _laplacian_(w: Tensor, i: Tensor | None, j: Tensor | None) -> Tensor | None:
    """``w <- w - diag(rowsum w)`` in place, with the diagonal and the exact pairs (i, j) of w
    left out of the Gram-path matrix; returns their weights ``w[i, j]`` (None without pairs)."""
    diag = w.diagonal()
    diag.zero_()  # d_ii is a constant
    wp = None
    if i is not None:
        wp = w[i, j]
        w[i, j] = 0.0
        w[j, i] = 0.0
    diag.sub_(w.sum(dim=1))
    return wp


def _sq_dist_grad(w: Tensor, wp: Tensor | None, saved: tuple, dtype: torch.dtype) -> Tensor:
    """dL/dz (B, dim) = -sum_j w_ij (z_i - z_j) for symmetric ``w_ij = -2 (dL/dd_ij + dL/dd_ji)``
    (raw d), given as ``(w, wp)`` from :func:`_laplacian_`.

    On the Gram path this is ``w @ Zc`` (no centring backward needed: the Laplacian has zero
    column sums), or ``w @ z`` when the forward saved no mean (equal: zero row sums too); the
    exact pairs get their terms from z_i - z_j.
    """
    z, mu, zc, i, j = saved
    grad = _gram_backward(w, z, mu, zc, dtype)
    if i is not None:
        acc = grad if grad.dtype == dtype else grad.to(dtype)
        for s, e, zi, zj in _pair_rows(z, i, j, dtype):
            step = (zi - zj).mul_(wp[s:e, None])
            acc.index_add_(0, i[s:e], step, alpha=-1)
            acc.index_add_(0, j[s:e], step)
        grad = acc.to(z.dtype)
    return grad


class _SqDist(torch.autograd.Function):
    """Squared l2 distances (B, B) times ``scale``; exact for near-duplicate pairs."""

    @staticmethod
    def forward(ctx, z: Tensor, scale: float, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        d, saved = _sq_dist_forward(z, dtype)
        ctx.save_for_backward(*saved)
        ctx.scale, ctx.dtype = scale, dtype
        return d.mul_(scale) if scale != 1 else d

    @staticmethod
    @_first_order
    def backward(ctx, grad_d: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        saved = ctx.saved_tensors
        w = (grad_d + grad_d.T).mul_(-2 * ctx.scale)
        wp = _laplacian_(w, saved[3], saved[4])
        return _sq_dist_grad(w, wp, saved, ctx.dtype), None, None


class _InfoNCEL2(torch.autograd.Function):
    """``log (1 / N_pairs) sum_ij exp(-d_ij * scale / tau)`` fused with its distances.

    One autograd node, and the backward's B x B matrix is prepared in the forward, so the
    backward is one matmul: the loss is called per group of a few samples in small models,
    where the cost of separate small operations dominates.
    """

    @staticmethod
    def forward(ctx, z: Tensor, scale: float, tau: float, diag: bool, dtype: torch.dtype):  # type: ignore[override]
        b = z.shape[0]
        d, saved = _sq_dist_forward(z, dtype)
        coef = scale / tau
        # log(sum exp) - log n, never log(mean(exp)): exp(-d / tau) underflows when spread
        # out. With the diagonal the largest logit is exactly 0 (d_ii), so no shift is needed.
        if diag:
            e = d.mul_(-coef).exp_()
            total = e.sum()
            lse = total.log()
        else:
            logits = d.mul_(-coef)
            logits.diagonal().fill_(-math.inf)
            top = logits.amax()
            e = logits.sub_(top).exp_()
            total = e.sum()
            lse = total.log().add_(top)
        # dL/dd_ij = -coef e_ij / total, the softmax weights. d is symmetric (up to rounding,
        # which using 2 e_ij for e_ij + e_ji does not amplify): w = 4 coef e / total.
        w = e.div_(total)
        wp = _laplacian_(w, saved[3], saved[4])
        ctx.save_for_backward(w, wp, *saved)
        ctx.coef, ctx.dtype = 4 * coef, dtype
        return lse.sub_(math.log(b * b if diag else b * (b - 1)))

    @staticmethod
    @_first_order
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        w, wp, *saved = ctx.saved_tensors
        c = grad_out * ctx.coef
        wp = wp * c if wp is not None else None
        return _sq_dist_grad(w * c, wp, saved, ctx.dtype), None, None, None, None


def _infonce_from_pdist(pd: Tensor, b: int, coef: float, diag: bool):
    """``(loss, e, total)`` from pdist's distances: e_k = exp(x_k - shift) of the pair logits
    x_k = -coef pd_k^2 and ``total`` their sum over both triangles (+ the diagonal)."""
    x = pd.square().mul_(-coef)  # logits of the pairs i < j
    if diag:  # the diagonal's logits are exactly 0, the largest: no shift needed
        e = x.exp_()
        total = e.sum().mul_(2).add_(b)
        lse = total.log()
    else:
        top = x.amax()
        e = x.sub_(top).exp_()
        total = e.sum().mul_(2)
        lse = total.log().add_(top)
    return lse.sub_(math.log(b * b if diag else b * (b - 1))), e, total


# pdist's own backward kernel (the one its autograd formula calls); a recomputation through
# autograd stands in should a torch build not expose it.
_PDIST_BACKWARD = getattr(torch.ops.aten, "_pdist_backward", None)


class _InfoNCEPdist(torch.autograd.Function):
    """InfoNCE-l2 from the B(B-1)/2 distances of ``torch.nn.functional.pdist``, for small B.

    pdist computes each distance from z_i - z_j (exact for near-duplicate pairs, and so is
    its backward), and with a handful of pairs this costs less than the Gram path's fixed
    cost. Both triangles count (d_ij = d_ji), plus the diagonal when ``diag``. One autograd
    node: the backward calls pdist's backward kernel directly.
    """

    @staticmethod
    def forward(ctx, z: Tensor, coef: float, diag: bool, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        # contiguous: pdist's backward kernel refuses strided input (a transposed z, say).
        zz = (z if z.dtype == dtype else z.to(dtype)).contiguous()
        pd = torch.nn.functional.pdist(zz)
        # An Inf in z gives infinite distances (zero weight), not a non-finite loss.
        host = _host_checks(z.device)
        b = z.shape[0]
        # Where the Laplacian may serve, its near-pair test needs the distances on the host:
        # one read (<= 28 numbers) for both checks.
        vals = pd.tolist() if host and _takes_laplacian(b, zz.shape[1]) else None
        if host and not math.isfinite(pd.sum().item() if vals is None else sum(vals)):
            _check_finite(z, "z")
        loss, e, total = _infonce_from_pdist(pd, b, coef, diag)
        # dL/dpd_k = w_k pd_k with w_k = -4 coef e_k / total (x_k = -coef pd_k^2, both
        # triangles), and dpd_ij/dz_i = (z_i - z_j) / pd_ij: dL/dz_i = sum_j w_ij (z_i - z_j).
        c = total.reciprocal().mul_(-4 * coef)
        lap = None if vals is None else _pdist_laplacian(zz, vals, e * c, b)
        if lap is not None:
            ctx.save_for_backward(zz, lap)
        else:
            ctx.save_for_backward(zz, pd, e.mul_(pd).mul_(c))
        ctx.in_dtype = z.dtype
        return loss if host else _nan_if_nonfinite(loss, pd)

    @staticmethod
    @_first_order
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if len(ctx.saved_tensors) == 2:  # no near pair: one matmul with the Laplacian
            zz, lap = ctx.saved_tensors
            return torch.mm(lap * grad_out, zz).to(ctx.in_dtype), None, None, None
        zz, pd, grad_pd = ctx.saved_tensors
        grad_pd = grad_pd * grad_out
        if _PDIST_BACKWARD is not None:
            grad = _PDIST_BACKWARD(grad_pd, zz, 2.0, pd)
        else:
            with torch.enable_grad():
                zr = zz.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(torch.nn.functional.pdist(zr), zr, grad_pd)
        return grad.to(ctx.in_dtype), None, None, None


def _takes_laplacian(b: int, dim: int) -> bool:
    """Whether the pdist path's backward may be the Laplacian matmul (on the CPU). Batches of
    9-16 (pdist's range only up to dim 4,096) keep pdist's backward: not measured there, and
    it keeps the Fashion-MNIST study's groups of 16 bit for bit."""
    return _LAPLACIAN_MIN_B <= b <= _PDIST_MAX_B and b * (b - 1) // 2 * dim >= _LAPLACIAN_MIN_WORK


@functools.lru_cache(maxsize=32)
def _laplacian_map(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """M (B^2, B(B-1)/2) with ``(M @ w).view(B, B)`` the Laplacian ``diag(W 1) - W`` of pair
    weights w in pdist's order: one small matmul instead of a dozen indexing operations."""
    i, j = torch.triu_indices(b, b, 1).unbind(0)
    k = torch.arange(i.numel())
    m = torch.zeros(b, b, i.numel(), dtype=dtype)
    m[i, i, k] = 1.0
    m[j, j, k] = 1.0
    m[i, j, k] = -1.0
    m[j, i, k] = -1.0
    return m.reshape(b * b, -1).to(device)


def _pdist_laplacian(z: Tensor, pd: list[float], w: Tensor, b: int) -> Tensor | None:
    """The Laplacian ``diag(W 1) - W`` (B, B) of the pair weights ``w`` (pdist order), so that
    ``sum_j w_ij (z_i - z_j) = (lap @ z)_i``; None when a pair may be too near for it.

    The matmul forms ``sum_j w_ij z_i - w_ij z_j``, whose rounding (~eps (|z_i| + |z_j|) per
    term) stays below 12 eps of the pair's own term w_ij pd_ij while pd_ij^2 >
    _LAPLACIAN_NEAR (r_i^2 + r_j^2), r_i >= |z_i|. The bound r_i = |z_0| + pd_0i (triangle
    inequality) needs one row's norm, not a pass over z; the distances ``pd`` are on the host
    already (the finiteness check read them), so the test is a loop over at most 28 pairs.
    Otherwise pdist's backward, exact from z_i - z_j, is used.
    """
    n0 = float(torch.linalg.vector_norm(z[0]))
    # pdist lists the pairs (0, 1), ..., (0, B - 1) first
    r2 = [n0 * n0] + [(n0 + d) ** 2 for d in pd[: b - 1]]
    k = 0
    for i in range(b - 1):
        for j in range(i + 1, b):
            if pd[k] * pd[k] <= _LAPLACIAN_NEAR * (r2[i] + r2[j]):
                return None
            k += 1
    return torch.mv(_laplacian_map(b, w.dtype, w.device), w).view(b, b)


def _use_pdist(b: int, dim: int) -> bool:
    """Small batches: the B(B-1)/2 direct distances beat the Gram path's fixed cost."""
    return b <= _PDIST_MAX_B or (b <= 2 * _PDIST_MAX_B and dim <= _PDIST_MAX_DIM)


def _cos_gap(a: Tensor, b: Tensor, na: Tensor, nb: Tensor) -> tuple[Tensor, Tensor]:
    """``(v, 1 - cos)`` for rows a, b (P, dim) with norms na, nb (P, 1): v = a/|a| - b/|b|.

    Accurate when a and b are nearly parallel: a - b is exact there and
    |a| - |b| = (a - b).(a + b) / (|a| + |b|) avoids the cancellation of the norms.
    """
    diff = a - b
    dn = (diff * (a + b)).sum(dim=1, keepdim=True) / (na + nb)
    v = (diff - b * (dn / nb)) / na
    return v, 0.5 * v.square().sum(dim=1)


def _norms(z: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.linalg.vector_norm(z, dim=1, dtype=dtype, keepdim=True).clamp_min(_NORM_EPS)


class _NegCos(torch.autograd.Function):
    """-cos(z_i, z_j) (B, B), exactly -1 on the diagonal (also for zero rows).

    Pairs with 1 - cos <= _NEAR are recomputed with :func:`_cos_gap` (forward and backward).
    """

    @staticmethod
    def forward(ctx, z: Tensor, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        g, mu, zc = _gram(z, False, dtype)
        n = g.diagonal().clamp_min(torch.finfo(dtype).tiny).sqrt().clamp_min(_NORM_EPS)
        cos = g.div_(n[:, None]).div_(n)
        near = cos >= 1 - _NEAR
        near.diagonal().fill_(False)
        i = j = None
        if bool(near.any()):
            i, j = _near_pairs(near)
            gap = torch.empty(i.numel(), dtype=dtype, device=z.device)
            for s, e, zi, zj in _pair_rows(z, i, j, dtype):
                gap[s:e] = _cos_gap(zi, zj, n[i[s:e], None], n[j[s:e], None])[1]
            cos[i, j] = 1 - gap
            cos[j, i] = 1 - gap
        cos.diagonal().fill_(1.0)
        ctx.save_for_backward(cos, n, z, mu, zc, i, j)
        ctx.dtype = dtype
        return cos.neg()

    @staticmethod
    @_first_order
    def backward(ctx, grad_dis: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        cos, n, z, mu, zc, i, j = ctx.saved_tensors
        dtype = ctx.dtype
        # m_ij = dL/dcos_ij + dL/dcos_ji; dcos_ij/dz_i = (z_j / n_j - cos_ij z_i / n_i) / n_i.
        m = (grad_dis + grad_dis.T).neg_()
        m.diagonal().zero_()
        if i is not None:
            mp = m[i, j]
            m[i, j] = 0.0
            m[j, i] = 0.0
        k = m / n[:, None] / n
        k.diagonal().copy_((m * cos).sum(dim=1).div_(n.square()).neg_())
        grad = _gram_backward(k, z, mu, zc, dtype)
        if i is not None:
            acc = grad if grad.dtype == dtype else grad.to(dtype)
            for s, e, zi, zj in _pair_rows(z, i, j, dtype):
                na, nb = n[i[s:e], None], n[j[s:e], None]
                v, gap = _cos_gap(zi, zj, na, nb)
                c, h = mp[s:e, None], gap[:, None]
                # d(1 - cos)/da = (v - h a/|a|) / |a|; d(1 - cos)/db = (-v - h b/|b|) / |b|
                acc.index_add_(0, i[s:e], (v - h * zi / na) / na * c, alpha=-1)
                acc.index_add_(0, j[s:e], (-v - h * zj / nb) / nb * c, alpha=-1)
            grad = acc.to(z.dtype)
        return grad, None


def _inv_std(var: Tensor) -> tuple[Tensor, Tensor]:
    """``(s, live)`` of per-feature variances ``var`` (..., dim): s = (var + eps mean(var))^-1/2
    with the sum floored at the dtype's smallest normal, and where the floor was not hit (the
    only place s has a gradient)."""
    v = var + _COV_EPS * var.mean(dim=-1, keepdim=True)
    floor = torch.finfo(var.dtype).tiny
    return v.clamp_min(floor).rsqrt(), v >= floor


def _standardize(z: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-feature standardisation over the batch (covariance variant), in ``dtype``."""
    b = z.shape[0]
    zc = z.to(dtype)
    zc = zc - zc.mean(dim=0)
    return zc * _inv_std(zc.square().sum(dim=0) / (b - 1))[0]


def _dissimilarity(z: Tensor, variant: str, normalize_by_dim: bool, dtype: torch.dtype) -> Tensor:
    if variant == "infonce_cosine":
        return _NegCos.apply(z, dtype)
    return _SqDist.apply(z, 1 / z.shape[1] if normalize_by_dim else 1.0, dtype)


def _reduce_infonce(dis: Tensor, tau: float, include_diagonal: bool) -> Tensor:
    b = dis.shape[0]
    logits = -dis / tau
    if include_diagonal:
        n_pairs = b * b
    else:
        logits = logits.masked_fill(_eye(b, dis.device), -math.inf)
        n_pairs = b * (b - 1)
    # logsumexp - log n, never log(mean(exp)): exp(-d / tau) underflows for spread-out batches.
    return torch.logsumexp(logits.reshape(-1), dim=0) - math.log(n_pairs)


def _reduce_hinge(d: Tensor, margin: float, include_diagonal: bool) -> Tensor:
    b = d.shape[0]
    h = torch.relu(margin - d).square()
    if include_diagonal:
        return h.sum() / (b * b)
    return h.masked_fill(_eye(b, d.device), 0.0).sum() / (b * (b - 1))


def _covariance_sum_sq(zn_a: Tensor, zn_b: Tensor) -> Tensor:
    """sum_{m,n} C_mn^2 for the cross-covariance C = Zn_a^T Zn_b / (B - 1) (the contrastive
    counterpart), through B x B Gram matrices only (the dispersive one: _GroupedCovariance)."""
    b = zn_a.shape[0]
    ga = _Gram.apply(zn_a, False, zn_a.dtype)
    gb = _Gram.apply(zn_b, False, zn_b.dtype)
    # ||A^T B||_F^2 = tr(A A^T B B^T) = sum_ij Ga_ij Gb_ij (both symmetric)
    return (ga * gb).sum() / (b - 1) ** 2


class _GroupedCovariance(torch.autograd.Function):
    """The covariance variant averaged over k consecutive groups of g samples, in one node.

    Per group Z (g, dim): Zc = Z - mean over the group, s_j = (var_j + eps mean_l var_l)^-1/2
    (the per-feature standardisation, var with ddof 1, floored as :func:`_inv_std`),
    Zn = Zc diag(s), loss = ||Zn Zn^T||_F^2 * ``scale`` (= ||Zn^T Zn||_F^2 * scale). The
    backward is written out: dL/dZn = c (G + G^T) Zn (one batched matmul), then the
    standardisation's and the centring's backward in a few elementwise passes, instead of the
    ~20 autograd nodes (per group) of the composed form. z (k g, dim) in any float dtype; the
    arithmetic in ``dtype``; no value is read back to the host.
    """

    @staticmethod
    def forward(ctx, z: Tensor, g: int, scale: float, dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        zc = z.reshape(-1, g, z.shape[1]).to(dtype)  # (k, g, dim)
        zc = zc - zc.mean(dim=1, keepdim=True)
        s, live = _inv_std(zc.square().sum(dim=1).div_(g - 1))  # (k, dim) each
        zn = zc * s[:, None, :]
        gm = torch.bmm(zn, zn.transpose(1, 2))  # (k, g, g)
        ctx.save_for_backward(zc, s, live, gm)
        ctx.scale, ctx.z_dtype = scale, z.dtype
        return gm.square().sum(dim=(1, 2)).mean().mul_(scale)

    @staticmethod
    @_first_order
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        zc, s, live, gm = ctx.saved_tensors
        k, g, dim = zc.shape
        c = grad_out.to(zc.dtype) * (2 * ctx.scale / k)  # dL/dG = c G per group
        s3 = s[:, None, :]
        dzc = torch.bmm(gm + gm.transpose(1, 2), zc * s3).mul_(c)  # dL/dZn
        ds = (dzc * zc).sum(dim=1)  # (k, dim): Zn = Zc s, through s
        dzc.mul_(s3)  # ... and through Zc
        # s = v^-1/2 (clamped: no gradient where v was below the floor, even if s^3 overflows;
        # multiplied in steps so a small ds does not meet s^3 whole)
        dv = torch.where(live, ds.mul_(s).mul_(s).mul_(s).mul_(-0.5), 0.0)
        dvar = dv.add_(dv.mean(dim=1, keepdim=True), alpha=_COV_EPS)  # v = var + eps mean(var)
        dzc.add_(zc * dvar[:, None, :], alpha=2 / (g - 1))  # var = sum_g Zc^2 / (g - 1)
        # The centring's backward: a no-op in exact arithmetic (Zc and G Zn have zero column
        # sums, 1^T G = 1^T Zn Zn^T = 0), but it removes the rounding's common part (dropped,
        # the duplicates test at D = 250,000 measured 2.5e-5 relative error against 1e-5).
        dz = dzc.sub_(dzc.mean(dim=1, keepdim=True))
        return dz.reshape(-1, dim).to(ctx.z_dtype), None, None, None


def _covariance(z: Tensor, g: int, normalize_by_dim: bool, dtype: torch.dtype) -> Tensor:
    """The covariance variant of z (k g, dim), averaged over k groups of g: the fused node."""
    scale = 1 / (g - 1) ** 2 / (z.shape[1] ** 2 if normalize_by_dim else 1)
    return _GroupedCovariance.apply(z, g, scale, dtype)


def _dispersive_2d(
    z: Tensor,
    *,
    variant: str,
    tau: float,
    margin: float,
    normalize_by_dim: bool,
    include_diagonal: bool,
    dtype: torch.dtype,
) -> Tensor:
    """The loss on a flattened (and gathered) batch (B, dim), B >= 2 (finiteness unchecked)."""
    if variant == "covariance":
        return _covariance(z, z.shape[0], normalize_by_dim, dtype)
    if variant == "infonce_l2":
        b, dim = z.shape
        coef = (1 / dim if normalize_by_dim else 1.0) / tau
        if _use_pdist(b, dim):
            return _InfoNCEPdist.apply(z, coef, include_diagonal, dtype)
        return _InfoNCEL2.apply(z, coef * tau, tau, include_diagonal, dtype)
    dis = _dissimilarity(z, variant, normalize_by_dim, dtype)
    if variant == "hinge":
        return _reduce_hinge(dis, margin, include_diagonal)
    return _reduce_infonce(dis, tau, include_diagonal)


# --------------------------------------------------------------------------------------------
# Global scope: a differentiable all_gather
# --------------------------------------------------------------------------------------------


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AllGather(torch.autograd.Function):
    """Concatenate z (B_r, dim) from every rank along dim 0 (ranks may hold different B_r).

    Backward all-reduces (sums) the incoming gradient over ranks and returns this rank's rows:
    grad_r = sum_s dL_s / dz_r, where L_s is the loss computed on rank s.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        shape = torch.tensor(z.shape, dtype=torch.long, device=z.device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape)
        sizes = [int(s[0]) for s in shapes]
        dims = {int(s[1]) for s in shapes}
        if len(dims) != 1:
            raise ValueError(
                f"scope='global' needs the same number of features per sample on every rank; "
                f"got {sorted(dims)}. Tap the same layer of the same model on all ranks."
            )
        top = max(sizes)
        # all_gather needs equal shapes: pad to the largest per-rank batch, then trim.
        padded = torch.cat([z, z.new_zeros(top - z.shape[0], z.shape[1])]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def _gather(z: Tensor, scope: str) -> Tensor:
    if scope == "global" and _world_size() > 1:
        return _AllGather.apply(z)
    return z


# --------------------------------------------------------------------------------------------
# torch.compile: the loss as one opaque custom operator (no graph break)
#
# The eager code branches on data (near-duplicate pairs found with nonzero, the non-finite
# check's .item()), which torch.compile can only trace by breaking the graph. Under compilation
# the public entry points call one custom operator instead: it runs the eager code itself
# (values, gradients and NonFiniteInputError exactly as in eager mode) and returns the loss
# with its gradient, computed in the same call when z requires grad; its backward scales that
# gradient by the incoming one (first-order only, as the eager loss's fused backwards).
# --------------------------------------------------------------------------------------------


def _compiling() -> bool:
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check()) if check is not None else False


def _eager_call(kind: str, z: Tensor, z_pos: Tensor | None, opts: dict) -> Tensor:
    if kind == "loss":
        return dispersive_loss(z, **opts)
    if kind == "contrastive":
        return contrastive_loss(z, z_pos, **opts)
    module = DispersiveLoss(**opts)  # kind "module": DispersiveLoss's groups
    return module(z) if z_pos is None else module.contrastive(z, z_pos)


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    # A custom operator's implementation runs below the autograd dispatch keys (excluded in
    # thread-local state); the eager loss needs them back to differentiate itself.
    keys = torch._C.DispatchKey
    excluded = torch._C._dispatch_tls_local_exclude_set()
    excluded = excluded.remove(keys.AutogradFunctionality).remove(keys.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


def _loss_and_grads_impl(
    z: Tensor,
    z_pos: Tensor | None,
    kind: str,
    variant: str,
    tau: float,
    margin: float,
    normalize_by_dim: bool,
    include_diagonal: bool,
    scope: str,
    group_size: int,
    off_diagonal_weight: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    opts = dict(
        variant=variant,
        tau=tau,
        margin=margin,
        normalize_by_dim=normalize_by_dim,
        include_diagonal=include_diagonal,
        scope=scope,
    )
    if kind == "contrastive":
        opts["off_diagonal_weight"] = off_diagonal_weight
    elif kind == "module":
        opts["group_size"] = group_size
    with _autograd_inside_op(), torch.enable_grad():
        leaves = [t.detach().requires_grad_(need_grad) for t in (z, z_pos) if t is not None]
        loss = _eager_call(kind, leaves[0], leaves[1] if len(leaves) > 1 else None, opts)
        if need_grad:
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            grads = [
                torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(leaves, grads)
            ]
        else:
            grads = [t.new_empty(0) for t in leaves]
    if z_pos is None:
        grads.append(z.new_empty(0))
    return loss.detach(), grads[0], grads[1]


def _loss_and_grads_fake(
    z,
    z_pos,
    kind,
    variant,
    tau,
    margin,
    normalize_by_dim,
    include_diagonal,
    scope,
    group_size,
    off_diagonal_weight,
    need_grad,
):
    dtype = _compute_dtype(z)
    if z_pos is not None:
        dtype = torch.promote_types(dtype, _compute_dtype(z_pos))
    loss = z.new_empty((), dtype=dtype)
    grads = [
        torch.empty_like(t, memory_format=torch.contiguous_format) if need_grad else t.new_empty(0)
        for t in (z, z_pos if z_pos is not None else z)
    ]
    if z_pos is None:
        grads[1] = z.new_empty(0)
    return loss, grads[0], grads[1]


def _loss_and_grads_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])


def _loss_and_grads_backward(ctx, grad_loss, _gz, _gp):
    gz, gp = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = (grad_loss * gz if need[0] else None, grad_loss * gp if need[1] else None)
    return *grads, *[None] * 10


# A custom operator needs torch >= 2.4 (and the dispatcher's key guards, private API); without
# them torch.compile traces the eager code (with graph breaks).
_LOSS_AND_GRADS = None
if hasattr(torch.library, "custom_op") and hasattr(torch._C, "_ForceDispatchKeyGuard"):
    _LOSS_AND_GRADS = torch.library.custom_op("dispersive::loss_and_grads", mutates_args=())(
        _loss_and_grads_impl
    )
    _LOSS_AND_GRADS.register_fake(_loss_and_grads_fake)
    _LOSS_AND_GRADS.register_autograd(_loss_and_grads_backward, setup_context=_loss_and_grads_setup)


def _compiled_call(kind: str, z: Tensor, z_pos: Tensor | None, **opts) -> Tensor:
    """The loss through :data:`_LOSS_AND_GRADS` (under torch.compile)."""
    tensors = [t for t in (z, z_pos) if t is not None]
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # Every caller passes the six loss options; only the other kinds' extras need a value.
    full = dict(group_size=0, off_diagonal_weight=1.0) | opts
    return _LOSS_AND_GRADS(z, z_pos, kind, need_grad=need_grad, **full)[0]


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def dispersive_loss(
    z: Tensor,
    *,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    normalize_by_dim: bool = True,
    include_diagonal: bool = True,
    scope: str = "local",
) -> Tensor:
    """Dispersive Loss of a batch of activations (paper Table 1; definitions in the module doc).

    Args:
        z: activations (B, ...) of one forward pass, any floating dtype; each sample is
            flattened to ``dim`` numbers. B >= 2 (per device for ``scope="local"``).
        variant: ``"infonce_l2"`` (paper default), ``"infonce_cosine"``, ``"hinge"`` or
            ``"covariance"``.
        tau: InfoNCE temperature (> 0).
        margin: hinge margin epsilon (> 0), on the same distance as ``infonce_l2``.
        normalize_by_dim: divide the squared l2 distance by ``dim`` (the authors' code does; it
            makes tau transfer across widths); the covariance sum is divided by ``dim^2``.
            Ignored by ``infonce_cosine``.
        include_diagonal: keep the i == j pairs (paper and authors' code); ignored by
            ``covariance``.
        scope: ``"local"``: this process's batch (authors' semantics). ``"global"``: z is
            gathered from all ranks (differentiable) and the loss L is computed on the
            concatenated batch, identically on every rank. The gradient that reaches rank r's z
            is ``sum_s dL_s/dz_r = world_size * dL/dz_r``; DDP then averages parameter gradients
            over ranks, so the result equals the one-process gradient of L on the concatenated
            batch. Every rank must call the loss and backward (collective operations).

    Returns:
        A scalar tensor (float32, or float64 for float64 input).

    Raises:
        ValueError: B < 2, non-finite z (``NonFiniteInputError``, also under torch.compile),
            z with fewer than 2 dims, unknown variant/scope, tau or margin not > 0, different
            ``dim`` on different ranks (global scope).
        TypeError: z is not a floating-point tensor.

    Under ``torch.compile`` the call is one opaque custom operator (no graph break; see the
    module docstring).
    """
    _check_options(variant, tau, margin, scope)
    z2 = _flatten(z)
    if _LOSS_AND_GRADS is not None and _compiling():
        opts = dict(variant=variant, tau=tau, margin=margin, scope=scope)
        opts |= dict(normalize_by_dim=normalize_by_dim, include_diagonal=include_diagonal)
        return _compiled_call("loss", z, None, **opts)
    dtype = _compute_dtype(z2)
    with _no_autocast(z2.device):
        if scope == "global" and _world_size() > 1:
            z2 = _gather(z2.to(dtype), scope)
        _check_batch(z2.shape[0], scope)
        loss = _dispersive_2d(
            z2,
            variant=variant,
            tau=tau,
            margin=margin,
            normalize_by_dim=normalize_by_dim,
            include_diagonal=include_diagonal,
            dtype=dtype,
        )
    if variant in ("infonce_l2", "hinge"):
        return loss  # the l2 distances have checked z already
    return _checked(loss, (z2, "z"))


class DispersiveLoss(nn.Module):
    """:func:`dispersive_loss` as a module (no parameters); ``forward(z) -> scalar``.

    Takes the same keywords as :func:`dispersive_loss` (checked at construction), plus
    ``group_size``: with ``group_size = g > 0`` and ``scope="local"``, a batch of B = k g
    samples is split into k consecutive groups of g and the loss is the mean of the k group
    losses. The paper's loss sees 16 samples per device; groups of 16 keep that objective
    whatever the per-device batch (0 = the whole batch, one group). InfoNCE-l2 at pdist sizes
    and the covariance variant run all groups in one autograd node; the other variants call
    :func:`dispersive_loss` once per group.
    """

    def __init__(
        self,
        *,
        variant: str = "infonce_l2",
        tau: float = 0.5,
        margin: float = 1.0,
        normalize_by_dim: bool = True,
        include_diagonal: bool = True,
        scope: str = "local",
        group_size: int = 0,
    ) -> None:
        super().__init__()
        _check_options(variant, tau, margin, scope)
        if group_size < 0 or group_size == 1 or (group_size and scope != "local"):
            raise ValueError(
                f"group_size must be 0 or >= 2 samples, and only with scope 'local'; got "
                f"{group_size} (scope {scope!r})"
            )
        self.variant = variant
        self.tau = tau
        self.margin = margin
        self.normalize_by_dim = normalize_by_dim
        self.include_diagonal = include_diagonal
        self.scope = scope
        self.group_size = group_size

    def _options(self) -> dict:
        names = ("variant", "tau", "margin", "normalize_by_dim", "include_diagonal", "scope")
        return {k: getattr(self, k) for k in names}

    def forward(self, z: Tensor) -> Tensor:
        """z (B, ...) -> scalar loss (the mean over groups of ``group_size``)."""
        g = self.group_size
        if _LOSS_AND_GRADS is not None and _compiling():
            return _compiled_call("module", z, None, group_size=g, **self._options())
        # Several whole groups (scope is local whenever group_size is set): one autograd node
        # for all of them where a fused form exists.
        grouped = (
            self.scope == "local"
            and isinstance(z, Tensor)
            and z.ndim >= 2
            and g
            and z.shape[0] > g
            and z.shape[0] % g == 0
        )
        if grouped and self.variant == "infonce_l2" and _use_pdist(g, z[0].numel()):
            return _grouped_infonce_pdist(z, g, self.tau, self.normalize_by_dim,
                                          self.include_diagonal)  # fmt: skip
        if grouped and self.variant == "covariance":
            z2 = _flatten(z)
            with _no_autocast(z2.device):
                loss = _covariance(z2, g, self.normalize_by_dim, _compute_dtype(z2))
            return _checked(loss, (z2, "z"))
        return _group_mean(lambda g: dispersive_loss(g, **self._options()), self.group_size, z)

    def contrastive(self, z: Tensor, z_pos: Tensor) -> Tensor:
        """:func:`contrastive_loss` of two views (B, ...) with the same options and groups."""
        if _LOSS_AND_GRADS is not None and _compiling():
            return _compiled_call("module", z, z_pos, group_size=self.group_size, **self._options())
        fn = lambda a, b: contrastive_loss(a, b, **self._options())  # noqa: E731
        return _group_mean(fn, self.group_size, z, z_pos)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, tau={self.tau}, margin={self.margin}, "
            f"normalize_by_dim={self.normalize_by_dim}, "
            f"include_diagonal={self.include_diagonal}, scope={self.scope!r}, "
            f"group_size={self.group_size}"
        )


class _GroupedInfoNCEFromPdist(torch.autograd.Function):
    """The mean over k groups of :class:`_InfoNCEPdist`, in one autograd node.

    z (k g, dim) is split into k consecutive groups of g. Each group's distances come from the
    same ``pdist`` kernel and its gradient from the same kernel as one ``dispersive_loss`` per
    group (``_pdist_backward``, or the same Laplacian matmul where :class:`_InfoNCEPdist` takes
    it), and every other operation is the same elementwise one on a (k, pairs) tensor in the
    same order, so the value and the gradient are those of the per-group mean bit for bit,
    without k sets of checks, autograd nodes and host syncs (the Fashion-MNIST preset calls it
    with 4 groups of 16 every step). A batched Laplacian matmul for all groups in place of
    ``_pdist_backward`` measured only ~10% faster on the whole term and would give up the
    bitwise equality (runs already kept would no longer be reproduced exactly).
    """

    @staticmethod
    def forward(ctx, z: Tensor, g: int, coef: float, diag: bool) -> Tensor:  # type: ignore[override]
        zs = z.reshape(-1, g, z.shape[1]).contiguous()  # _pdist_backward needs it
        pd = torch.stack([torch.nn.functional.pdist(zk) for zk in zs])  # (k, g (g - 1) / 2)
        # An Inf in z gives infinite distances (zero weight), not a non-finite loss.
        host = _host_checks(z.device)
        # As in _InfoNCEPdist: one read of the distances serves both host checks.
        vals = pd.tolist() if host and _takes_laplacian(g, zs.shape[2]) else None
        if host and not math.isfinite(pd.sum().item() if vals is None else sum(map(sum, vals))):
            _check_finite(z, "z")
        x = pd.square().mul_(-coef)
        if diag:  # the diagonal's logits are exactly 0, the largest: no shift needed
            e = x.exp_()
            total = torch.stack([ek.sum() for ek in e]).mul_(2).add_(g)
            lse = total.log()
        else:
            top = torch.stack([xk.amax() for xk in x])
            e = x.sub_(top[:, None]).exp_()
            total = torch.stack([ek.sum() for ek in e]).mul_(2)
            lse = total.log().add_(top)
        losses = lse.sub_(math.log(g * g if diag else g * (g - 1)))
        # As _InfoNCEPdist: dL/dpd_k = e_k pd_k (-4 coef / total), per group; and as there,
        # large groups on the CPU take the Laplacian matmul where no pair is near.
        c = total.reciprocal().mul_(-4 * coef)[:, None]
        laps: list[Tensor | None] = [None] * zs.shape[0]
        if vals is not None:
            laps = [_pdist_laplacian(zk, vk, wk, g) for zk, vk, wk in zip(zs, vals, e * c)]
        grad_pd = e.mul_(pd).mul_(c)
        ctx.laps = laps
        ctx.save_for_backward(zs, pd, grad_pd)
        return losses.mean() if host else _nan_if_nonfinite(losses.mean(), pd)

    @staticmethod
    @_first_order
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        zs, pd, grad_pd = ctx.saved_tensors
        k = zs.shape[0]
        scale = grad_out.expand(k) / k  # the mean's backward
        grad_pd = grad_pd * scale[:, None]
        grad = zs.new_empty(zs.shape)
        for b in range(k):
            if ctx.laps[b] is not None:
                grad[b] = torch.mm(ctx.laps[b] * scale[b], zs[b])
            elif _PDIST_BACKWARD is not None:
                grad[b] = _PDIST_BACKWARD(grad_pd[b], zs[b], 2.0, pd[b])
            else:
                with torch.enable_grad():
                    zr = zs[b].detach().requires_grad_(True)
                    grad[b] = torch.autograd.grad(torch.nn.functional.pdist(zr), zr, grad_pd[b])[0]
        return grad.view(-1, zs.shape[2]), None, None, None


def _grouped_infonce_pdist(
    z: Tensor, g: int, tau: float, normalize_by_dim: bool, include_diagonal: bool
) -> Tensor:
    """InfoNCE-l2 averaged over consecutive groups of g samples of z (B, ...), B a multiple
    of g and g in pdist's range (:func:`_use_pdist`): :class:`_GroupedInfoNCEFromPdist`."""
    z2 = _flatten(z)
    dtype = _compute_dtype(z2)
    coef = (1 / z2.shape[1] if normalize_by_dim else 1.0) / tau
    with _no_autocast(z2.device):
        zc = z2 if z2.dtype == dtype else z2.to(dtype)
        return _GroupedInfoNCEFromPdist.apply(zc, g, coef, include_diagonal)


def _group_mean(fn, group: int, *zs: Tensor) -> Tensor:
    """``fn`` on consecutive groups of ``group`` samples of each of ``zs`` (B, ...), averaged;
    ``fn(*zs)`` itself when ``group`` is 0 or B."""
    b = zs[0].shape[0]
    if not group or group == b:
        return fn(*zs)
    if b % group:
        raise ValueError(f"a batch of {b} samples does not split into groups of {group}")
    parts = [z.reshape(b // group, group, *z.shape[1:]) for z in zs]
    return torch.stack([fn(*g) for g in zip(*parts)]).mean()


def contrastive_loss(
    z: Tensor,
    z_pos: Tensor,
    *,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    normalize_by_dim: bool = True,
    include_diagonal: bool = True,
    scope: str = "local",
    off_diagonal_weight: float = 1.0,
) -> Tensor:
    """The contrastive counterpart of each variant (paper Table 1/2): dispersive + positive term.

    ``z_pos[i]`` is the second view of sample ``i``. With ``dist`` the same (dis)similarity as
    :func:`dispersive_loss` (incl. ``/ dim``) and means over the B positive pairs:

    - ``infonce_*``: ``mean_i dist(z_i, z_pos_i) / tau + dispersive_loss(z)``. The negatives
      are the first view's batch, in the batch form of paper Eq. 6 (Wang & Isola's
      alignment + uniformity): it differs from Eq. 3 averaged over i by the Jensen gap of the
      batch form and the constant ``log N_pairs``.
    - ``hinge``: ``mean_i dist(z_i, z_pos_i)^2 + dispersive_loss(z, variant="hinge")``.
    - ``covariance`` (Barlow Twins): with the cross-covariance ``C = Zn^T Zn_pos / (B - 1)`` of
      the two views, each standardised per feature as in the dispersive variant,
      ``[sum_m (1 - C_mm)^2 + w sum_{m != n} C_mn^2] / N``, ``w = off_diagonal_weight``,
      ``N = dim^2`` if ``normalize_by_dim`` else 1. This equals ``w * sum_{m,n} C_mn^2 / N``
      (the dispersive form on the cross-covariance, which is ``w * dispersive_loss(z)`` when
      ``z_pos = z``) plus the positive term ``sum_m [(1 - C_mm)^2 - w C_mm^2] / N``.

    So for the first three, ``contrastive_loss(z, z_pos) - dispersive_loss(z)`` is exactly the
    positive term. Only the first view's batch provides negatives; z_pos gets gradient only
    through the positive term (and the cross-covariance).

    Args:
        z: first view (B, ...), the view that also receives the denoising loss.
        z_pos: second view, same shape as z.
        variant, tau, margin, normalize_by_dim, include_diagonal, scope: as in
            :func:`dispersive_loss` (``scope="global"`` gathers both views).
        off_diagonal_weight: Barlow Twins' ``w`` (covariance only; Barlow Twins used about
            5e-3 at dim 8192 without the ``/ dim^2``; the paper does not state its value).

    Returns:
        A scalar tensor (float32, or float64 when both views are float64).
    """
    _check_options(variant, tau, margin, scope)
    z2 = _flatten(z, "z")
    p2 = _flatten(z_pos, "z_pos")
    if z2.shape != p2.shape:
        raise ValueError(
            f"z and z_pos must have the same shape (one positive per sample); got "
            f"{tuple(z.shape)} and {tuple(z_pos.shape)}"
        )
    if _LOSS_AND_GRADS is not None and _compiling():
        opts = dict(variant=variant, tau=tau, margin=margin, scope=scope)
        opts |= dict(normalize_by_dim=normalize_by_dim, include_diagonal=include_diagonal)
        opts["off_diagonal_weight"] = off_diagonal_weight
        return _compiled_call("contrastive", z, z_pos, **opts)
    dtype = torch.promote_types(_compute_dtype(z2), _compute_dtype(p2))
    with _no_autocast(z2.device):
        if scope == "global" and _world_size() > 1:
            z2, p2 = _gather(z2.to(dtype), scope), _gather(p2.to(dtype), scope)
        b, dim = z2.shape
        _check_batch(b, scope)
        if variant == "covariance":
            zn, pn = _standardize(z2, dtype), _standardize(p2, dtype)
            c_diag = (zn * pn).sum(dim=0) / (b - 1)  # (dim,): C_mm
            total = _covariance_sum_sq(zn, pn)
            w = off_diagonal_weight
            loss = (1 - c_diag).square().sum() + w * (total - c_diag.square().sum())
            loss = loss / dim**2 if normalize_by_dim else loss
            return _checked(loss, (z2, "z"), (p2, "z_pos"))
        z2c, p2c = z2.to(dtype), p2.to(dtype)
        if variant == "infonce_cosine":
            # -cos = (1 - cos) - 1 with 1 - cos from differences: views are often nearly
            # parallel, where the plain dot-product form loses the gradient's digits.
            pos = _cos_gap(z2c, p2c, _norms(z2c, dtype), _norms(p2c, dtype))[1] - 1
        else:
            pos = (z2c - p2c).square().sum(dim=1)
            if normalize_by_dim:
                pos = pos / dim
        pos_term = pos.square().mean() if variant == "hinge" else pos.mean() / tau
        loss = pos_term + _dispersive_2d(
            z2,
            variant=variant,
            tau=tau,
            margin=margin,
            normalize_by_dim=normalize_by_dim,
            include_diagonal=include_diagonal,
            dtype=dtype,
        )
    return _checked(loss, (z2, "z"), (p2, "z_pos"))


@torch.no_grad()
def dispersion_stats(
    z: Tensor, *, tau: float = 0.5, normalize_by_dim: bool = True
) -> dict[str, float]:
    """Diagnostics of a batch of activations, for logging ("is it working?").

    Args:
        z: activations (B, ...), B >= 2, flattened per sample (this process's batch).
        tau: temperature of the InfoNCE-l2 loss and of ``active_frac``.
        normalize_by_dim: divide squared distances by ``dim``, as in the loss.

    Returns:
        ``loss``: InfoNCE-l2 dispersive loss with the diagonal, in [-log B, 0];
        ``floor_gap``: ``loss + log B`` (0 when every pair is far apart);
        and the keys of :func:`distance_stats` (``mean_dist``, ``min_dist``, ``active_frac``,
        ``rep_norm``), from the same distances.
    """
    z2, d = _stats_distances(z, tau, normalize_by_dim)
    with _no_autocast(z2.device):
        loss = float(_reduce_infonce(d, tau, include_diagonal=True))
    return {"loss": loss, "floor_gap": loss + math.log(z2.shape[0]), **_from_distances(z2, d, tau)}


@torch.no_grad()
def distance_stats(
    z: Tensor, *, tau: float = 0.5, normalize_by_dim: bool = True
) -> dict[str, float]:
    """The distance half of :func:`dispersion_stats`, without its loss (a training step that
    has computed its own dispersive loss logs that one).

    Args:
        z: activations (B, ...), B >= 2, flattened per sample.
        tau: temperature of ``active_frac``.
        normalize_by_dim: divide squared distances by ``dim``, as in the loss.

    Returns:
        ``mean_dist``, ``min_dist``: mean and minimum off-diagonal distance ``dist_ij``;
        ``active_frac``: fraction of off-diagonal pairs with ``exp(-dist_ij / tau) > 1e-3``
        (the pairs that still produce gradient);
        ``rep_norm``: mean l2 norm of the flattened samples (not divided by sqrt(dim)).
    """
    return _from_distances(*_stats_distances(z, tau, normalize_by_dim), tau)


def _stats_distances(z: Tensor, tau: float, normalize_by_dim: bool) -> tuple[Tensor, Tensor]:
    """Checked, flattened z (B, D) and its InfoNCE-l2 distances (B, B) in the compute dtype."""
    _check_options("infonce_l2", tau, 1.0, "local")
    z2 = _flatten(z)
    _check_batch(z2.shape[0], "local")
    _check_finite(z2, "z")
    with _no_autocast(z2.device):
        return z2, _dissimilarity(z2, "infonce_l2", normalize_by_dim, _compute_dtype(z2))


def _from_distances(z2: Tensor, d: Tensor, tau: float) -> dict[str, float]:
    dtype = _compute_dtype(z2)
    with _no_autocast(z2.device):
        off = d[~_eye(d.shape[0], d.device)]
        active = (torch.exp(-off / tau) > _ACTIVE_THRESHOLD).to(dtype).mean()
        rep_norm = torch.linalg.vector_norm(z2, dim=1, dtype=dtype).mean()
    return {
        "mean_dist": float(off.mean()),
        "min_dist": float(off.min()),
        "active_frac": float(active),
        "rep_norm": float(rep_norm),
    }
