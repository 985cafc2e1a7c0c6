"""Feature taps: read intermediate activations of an unmodified model through forward hooks.

Dispersive Loss regularises an activation of the *same* forward pass that produces the
prediction, so the model's code must not change. ``FeatureTap`` registers a persistent forward
hook on each named submodule; after the user's forward, ``pop()`` hands back what was recorded::

    tap = FeatureTap(model, "blocks.2")           # once, before DDP wrapping / torch.compile
    pred = model(x_t, t, y)
    loss = F.mse_loss(pred, target) + 0.5 * dispersive_loss(tap.pop(), tau=0.5)

Names are dotted module paths as in ``model.named_modules()``, with two conveniences:

* negative indices into an ``nn.ModuleList`` / ``nn.Sequential`` (``"blocks.-1"`` is the last
  block);
* wrapper modules are transparent: a single-child wrapper whose child is called ``module``
  (DistributedDataParallel), ``_orig_mod`` (torch.compile), ``_fsdp_wrapped_module`` (FSDP) or
  ``_checkpoint_wrapped_module`` (checkpoint_wrapper) is stepped through, and such a component in
  the name is skipped when the model does not have it. So ``"blocks.1"`` works on the bare model,
  on ``DDP(model)`` and on ``torch.compile(model)``, and ``"module.blocks.1"`` works on all three.

Behaviour in the cases where PyTorch gets subtle (each is tested in ``tests/test_taps.py``):

* Module outputs that are not a tensor (a tuple, a list, a dict or a diffusers ``BaseOutput``):
  the first tensor in order, searched depth-first, is recorded. Diffusers down blocks return
  ``(hidden_states, skip_states)``; the tap records ``hidden_states``.
* Several calls between two pops (weight sharing, or forwards without a pop in between such as a
  sampling pass inside the training loop): the latest call wins; ``counts`` says how many calls
  were recorded since the last pop.
* Activation checkpointing re-runs forwards during backward to rebuild saved tensors. Those
  recomputations happen inside the autograd engine and are never recorded, so the popped tensor is
  the one from the real forward, and with ``use_reentrant=False`` gradients flow into it exactly
  as without checkpointing. ``use_reentrant=True`` runs the real forward under ``no_grad``: the
  activation it produces is not part of any graph and a loss on it would silently train nothing,
  so ``pop()`` raises (use ``use_reentrant=False``, or ``detach=True`` to only read values).
* ``torch.compile``: hooks registered before compilation are traced into the compiled graph and
  record as in eager mode. Hooks added after the compiled model has run are not called by the
  compiled code; ``pop()`` then raises and says so.
* Copies: ``copy.deepcopy(model)`` keeps the hooks, but a copy's modules never record into the
  original's tap (create a tap on the copy if it is wanted).
* Inside ``torch.func`` transforms (``jvp``, ``vmap``), hooks would capture the transform's
  internal wrapper tensors; return the activation as an auxiliary output there instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureTap", "module_names", "resolve_module", "unwrap"]

# Children that wrappers put between the user and the real model. Stepped through only when
# they are the wrapper's single child, so an ordinary attribute called "module" beside others
# is not mistaken for a wrapper.
WRAPPER_ATTRS: tuple[str, ...] = (
    "module",  # DistributedDataParallel, DataParallel
    "_orig_mod",  # torch.compile's OptimizedModule
    "_fsdp_wrapped_module",  # FullyShardedDataParallel
    "_checkpoint_wrapped_module",  # torch.distributed checkpoint_wrapper
)


def _wrapped_child(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The (name, child) that ``module`` merely wraps, or None if it is not a wrapper."""
    children = list(module.named_children())
    if len(children) == 1 and children[0][0] in WRAPPER_ATTRS:
        return children[0]
    return None


def unwrap(model: Any) -> Any:
    """The plain module under wrappers (DDP ``.module``, ``torch.compile``'s ``._orig_mod``,
    FSDP, checkpoint wrappers; see ``WRAPPER_ATTRS``); anything else is returned as it is.

    The one unwrapping helper of the package: the EMA copies the plain model and MeanFlow's jvp
    runs on it (``torch.func.jvp`` cannot trace DDP's forward)."""
    while isinstance(model, nn.Module):
        wrapped = _wrapped_child(model)
        if wrapped is None:
            break
        model = wrapped[1]
    return model


def module_names(model: nn.Module) -> list[str]:
    """Every name ``resolve_module`` accepts for a submodule of ``model``, wrappers left out.

    The names are those of ``model.named_modules()`` with wrapper components (see
    ``WRAPPER_ATTRS``) removed, so they are the same for a bare model, ``DDP(model)`` and
    ``torch.compile(model)``. The root module itself (name ``""``) is not listed.

    Args:
        model: Any module, possibly wrapped.

    Returns:
        Dotted names in definition order, without duplicates.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"module_names expects an nn.Module, got {type(model).__name__}")
    names: list[str] = []
    seen: set[str] = set()

    def walk(module: nn.Module, prefix: str) -> None:
        wrapped = _wrapped_child(module)
        if wrapped is not None:
            walk(wrapped[1], prefix)
            return
        for child_name, child in module.named_children():
            full = f"{prefix}.{child_name}" if prefix else child_name
            if full not in seen:
                seen.add(full)
                names.append(full)
            walk(child, full)

    walk(model, "")
    return names


def _index_key(module: nn.Module, part: str, where: str) -> str | None:
    """Map an integer component (possibly negative) on a ModuleList/Sequential to its child key.

    Returns None when ``part`` is not an integer or ``module`` is not an indexable container, so
    the caller falls back to a plain name lookup.
    """
    if not isinstance(module, nn.ModuleList | nn.Sequential):
        return None
    try:
        index = int(part)
    except ValueError:
        return None
    keys = [name for name, _ in module.named_children()]
    n = len(keys)
    if not -n <= index < n:
        kind = type(module).__name__
        raise ValueError(
            f"index {index} is out of range for {where or 'the model'!r} ({kind} of length {n}); "
            f"use 0..{n - 1} or -{n}..-1"
        )
    return keys[index]


def _unknown_name_error(model: nn.Module, name: str, missing: str, where: str) -> ValueError:
    candidates = module_names(model)
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    msg = f"no submodule named {name!r} in {type(model).__name__}"
    msg += f" (no child {missing!r} under {where!r})" if where else f" (no child {missing!r})"
    if close:
        msg += "; did you mean " + ", ".join(repr(c) for c in close) + "?"
    else:
        top = [c for c in candidates if "." not in c][:12]
        msg += "; its top-level modules are " + ", ".join(repr(c) for c in top)
    msg += ". dispersive.taps.module_names(model) lists every valid name."
    return ValueError(msg)


def resolve_module(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """Find the submodule a tap name refers to.

    Args:
        model: The model, bare or wrapped by DDP / torch.compile / FSDP / checkpoint_wrapper.
        name: Dotted path such as ``"blocks.2"``, ``"blocks.-1"``, ``"module.blocks.2"`` or
            ``"down_blocks.1.resnets.0"``.

    Returns:
        ``(path, module)`` where ``path`` is the actual dotted path from ``model`` (wrapper
        components included, negative indices made positive), so that
        ``model.get_submodule(path) is module``.

    Raises:
        ValueError: unknown name (the message lists close matches), index out of range, or an
            empty name/component.
        TypeError: ``model`` is not a module or ``name`` not a string.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"resolve_module expects an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"a module name must be a str such as 'blocks.1', got {name!r}")
    parts = name.split(".")
    if name == "" or any(part == "" for part in parts):
        raise ValueError(
            f"invalid module name {name!r}: use a dotted path with non-empty components, "
            "for example 'blocks.1'"
        )
    path: list[str] = []
    current = model
    for part in parts:
        while True:
            where = ".".join(path)
            key = _index_key(current, part, where)
            children = dict(current.named_children())
            key = part if key is None else key
            if key in children:
                path.append(key)
                current = children[key]
                break
            wrapped = _wrapped_child(current)
            if wrapped is not None:
                # A wrapper the name does not mention: step through it and retry this part.
                path.append(wrapped[0])
                current = wrapped[1]
                continue
            if part in WRAPPER_ATTRS:
                # The name mentions a wrapper ("module.blocks.1") the model does not have.
                break
            raise _unknown_name_error(model, name, part, where)
    return ".".join(path), current


def _first_tensor(output: Any) -> Tensor | None:
    """The first tensor in a module output (tensor, tuple/list, or mapping), depth-first."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _any_requires_grad(obj: Any) -> bool:
    if isinstance(obj, Tensor):
        return obj.requires_grad
    if isinstance(obj, Mapping):
        return any(_any_requires_grad(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_any_requires_grad(v) for v in obj)
    return False


if hasattr(torch.compiler, "is_compiling"):
    _is_compiling = torch.compiler.is_compiling
else:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling


def _in_autograd_engine() -> bool:
    """True while the autograd engine runs a backward pass in this thread.

    Activation checkpointing re-runs forwards from inside backward (non-reentrant: in the
    unpack hook of a saved tensor; reentrant: in the custom Function's backward). A genuine
    forward never runs there, so this is how a tap tells recomputation from a real call.
    """
    if _is_compiling():
        # Tracing a forward (hooks registered before compile are traced in): not a backward.
        return False
    return torch._C._current_graph_task_id() != -1


class FeatureTap:
    """Record the outputs of named submodules during forward, for a loss on them.

    Args:
        model: The model (bare, or already wrapped by DDP / torch.compile: names resolve through
            the wrapper, see ``resolve_module``). Create the tap before ``torch.compile`` runs
            the model, otherwise the compiled code never calls the hooks.
        names: One name (``pop()`` then returns a Tensor) or a sequence of names (``pop()``
            returns a dict keyed by the names as given). Names may use negative indices
            (``"blocks.-1"``). Every name is checked here; an unknown one raises ``ValueError``
            listing close matches, before any hook is registered.
        detach: Record ``output.detach()`` (for monitoring, e.g. ``dispersion_stats``): no graph
            is kept alive and no gradient flows through the recorded activation.

    Attributes:
        names: The names as given, as a tuple (one element when a single str was given).
        resolved: Dict ``name -> actual module path`` (wrappers and positive indices filled in).
        detach: As given.

    Recorded activation: the module's output, or for a tuple/list/dict output its first tensor
    (depth-first). Shape is the module's, e.g. (B, T, D) for a transformer block, (B, C, H, W)
    for a conv block; the loss flattens it per sample.
    """

    def __init__(
        self, model: nn.Module, names: str | Sequence[str], *, detach: bool = False
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureTap expects an nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            given: tuple[str, ...] = (names,)
            self._single = True
        elif isinstance(names, Sequence) and all(isinstance(n, str) for n in names):
            given = tuple(names)
            self._single = False
        else:
            raise TypeError(
                "FeatureTap names must be a str or a sequence of str such as ['blocks.1'], "
                f"got {names!r}"
            )
        if not given:
            raise ValueError("FeatureTap needs at least one module name, got an empty sequence")
        duplicates = sorted({n for n in given if given.count(n) > 1})
        if duplicates:
            raise ValueError(f"FeatureTap names must be distinct; repeated: {duplicates}")

        # Resolve everything first so that a bad name leaves no hook behind.
        modules: dict[str, nn.Module] = {}
        self.resolved: dict[str, str] = {}
        for name in given:
            self.resolved[name], modules[name] = resolve_module(model, name)

        self.names = given
        self.detach = bool(detach)
        self._model_name = type(model).__name__
        self._records: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}
        self._graphless: dict[str, bool] = {}
        self._removed = False
        self._handles = [
            modules[name].register_forward_hook(
                self._make_hook(name, modules[name]), with_kwargs=True
            )
            for name in given
        ]

    def _make_hook(self, name: str, target: nn.Module):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if module is not target:
                # copy.deepcopy(model) copies the hook dicts but not the hook functions, so a
                # copy made after the tap (an EMA model, say) would record into this tap.
                return
            if _in_autograd_engine():
                return  # checkpoint recomputation: keep the record of the real forward
            z = _first_tensor(output)
            if z is None:
                raise TypeError(
                    f"FeatureTap: module {self.resolved[name]!r} ({type(module).__name__}) "
                    f"returned {type(output).__name__} with no tensor in it; tap a submodule "
                    "that returns a tensor"
                )
            # Grad off while the inputs need grad: the forward of reentrant checkpointing.
            self._graphless[name] = (
                not self.detach
                and not torch.is_grad_enabled()
                and _any_requires_grad((args, kwargs))
            )
            self._records[name] = z.detach() if self.detach else z
            self._counts[name] = self._counts.get(name, 0) + 1

        return hook

    @property
    def counts(self) -> dict[str, int]:
        """Forward calls recorded per name since the last ``pop()`` (recomputations excluded)."""
        return {name: self._counts.get(name, 0) for name in self.names}

    @property
    def active(self) -> bool:
        """False once ``remove()`` has been called."""
        return not self._removed

    def _clear(self) -> None:
        self._records.clear()
        self._counts.clear()
        self._graphless.clear()

    def pop(self) -> Tensor | dict[str, Tensor]:
        """Return the activations recorded since the last pop, and forget them.

        Returns:
            A Tensor if the tap was created with a single str name, otherwise a dict
            ``{name: Tensor}`` keyed by the names as given, in the given order. Each tensor is
            the latest recorded output of that module (see the class docstring).

        Raises:
            RuntimeError: a name has no record since the last pop (no forward ran, the module is
                not used by the forward, the tap was removed, or it was created after
                ``torch.compile`` compiled the model), or an activation was recorded without a
                graph by reentrant checkpointing. The records are cleared in either case.
        """
        missing = [name for name in self.names if name not in self._records]
        graphless = [name for name in self.names if self._graphless.get(name, False)]
        records = dict(self._records)
        self._clear()
        if missing:
            raise RuntimeError(self._missing_message(missing, records))
        if graphless:
            raise RuntimeError(
                f"FeatureTap.pop(): the activation of {graphless[0]!r} was recorded with "
                "gradients disabled although its inputs require grad. This is what "
                "torch.utils.checkpoint(..., use_reentrant=True) does: the activation is not "
                "part of the autograd graph, so a loss on it would not train the model. Use "
                "use_reentrant=False, or FeatureTap(..., detach=True) to only read values."
            )
        if self._single:
            return records[self.names[0]]
        return {name: records[name] for name in self.names}

    def _missing_message(self, missing: list[str], records: Mapping[str, Tensor]) -> str:
        which = ", ".join(f"{n!r} (module {self.resolved[n]!r})" for n in missing)
        if self._removed:
            return (
                f"FeatureTap.pop(): nothing recorded for {which}: the tap was removed. "
                "Create a new FeatureTap to record again."
            )
        if records:
            got = ", ".join(repr(n) for n in self.names if n in records)
            return (
                f"FeatureTap.pop(): {got} recorded but nothing for {which} since the last pop(): "
                "is that module called by the model's forward?"
            )
        return (
            f"FeatureTap.pop(): nothing recorded for {which} since the last pop(). Call pop() "
            "once after each forward of the model. If the model went through torch.compile and "
            "ran before this tap was created, the compiled code does not call hooks added "
            "afterwards: create the FeatureTap before torch.compile (and before DDP wrapping)."
        )

    def remove(self) -> None:
        """Remove the hooks (idempotent). Records not yet popped can still be popped."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._removed = True

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = self.names[0] if self._single else list(self.names)
        state = "" if self.active else ", removed"
        return f"FeatureTap({self._model_name}, {names!r}, detach={self.detach}{state})"
