"""Recipes: named settings of the Dispersive Loss, the paper's and the authors' public PyTorch
code's. (A "preset" is a TOML config in configs/; models have "sizes".)

- ``"paper"``: lambda 0.5, tau 0.5, infonce_l2, first quarter of the depth
  (``blocks.{depth // 4 - 1}``), per-device batch 16 (paper Sec. 4, JAX).
- ``"authors-pytorch"``: lambda 0.25, tau 1.0, infonce_l2, last block (``blocks.{depth - 1}``),
  per-device batch 32 (the authors' public PyTorch code). Its ``train.py`` (SiT's) also differs
  outside the loss: AdamW with PyTorch's default betas (0.9, 0.999) where the paper's runs use
  (0.9, 0.95); ``configs/imagenet256-sit-*-disp-pytorch.toml`` set both.

Block names are 0-indexed module paths (as for :class:`dispersive.FeatureTap`); the paper's
"block 3 of 12" is ``blocks.2``. Both use ``normalize_by_dim=True`` (the authors' code divides
the squared distance by the feature count) and include the diagonal.

Example::

    from dispersive.recipes import get_recipe, resolve_block

    p = get_recipe("paper")
    tap = FeatureTap(model, resolve_block(p, model.depth))
    loss = mse + p.weight * dispersive_loss(tap.pop(), **p.loss_kwargs())
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BLOCK_RULES", "RECIPES", "Recipe", "get_recipe", "resolve_block"]

BLOCK_RULES: tuple[str, ...] = ("first_quarter", "last")


@dataclass(frozen=True)
class Recipe:
    """One named setting of the loss.

    Attributes:
        name: the recipe's name.
        weight: lambda, the loss weight in ``L = mean L_diff + lambda * L_disp``.
        tau: InfoNCE temperature.
        variant: the :func:`dispersive.dispersive_loss` variant.
        block_rule: ``"first_quarter"`` (block ``depth // 4``, 1-indexed) or ``"last"``.
        per_device_batch: the batch each device's loss saw in the source setting.
        normalize_by_dim: divide squared distances by the feature count.
        include_diagonal: keep the i == j pairs.
        note: where the numbers come from.
    """

    name: str
    weight: float
    tau: float
    variant: str
    block_rule: str
    per_device_batch: int
    normalize_by_dim: bool = True
    include_diagonal: bool = True
    note: str = ""

    def block_index(self, depth: int) -> int:
        """The 0-indexed block the loss is applied to, for a model with ``depth`` blocks.

        ``first_quarter`` is ``depth // 4 - 1`` (block 3 of 12 -> index 2); for ``depth < 4``
        the first quarter is the first block (index 0).
        """
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int (number of blocks); got {depth!r}")
        if self.block_rule == "first_quarter":
            return max(depth // 4, 1) - 1
        if self.block_rule == "last":
            return depth - 1
        raise ValueError(f"unknown block rule {self.block_rule!r}; valid rules: {BLOCK_RULES}")

    def loss_kwargs(self) -> dict[str, object]:
        """Keyword arguments for :func:`dispersive.dispersive_loss` (everything but the weight)."""
        return {
            "variant": self.variant,
            "tau": self.tau,
            "normalize_by_dim": self.normalize_by_dim,
            "include_diagonal": self.include_diagonal,
        }


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(
        name="paper",
        weight=0.5,
        tau=0.5,
        variant="infonce_l2",
        block_rule="first_quarter",
        per_device_batch=16,
        note="paper Sec. 4 defaults (JAX): lambda 0.5, tau 0.5, block 3 of 12 (first quarter); "
        "loss on each device's batch of 16 (global batch 256)",
    ),
    "authors-pytorch": Recipe(
        name="authors-pytorch",
        weight=0.25,
        tau=1.0,
        variant="infonce_l2",
        block_rule="last",
        per_device_batch=32,
        note="authors' public PyTorch code: lambda 0.25, tau 1.0, last block, squared distance "
        "divided by the feature count; loss on each GPU's batch of 32 (their train.py: AdamW "
        "with the default betas (0.9, 0.999), not the paper's (0.9, 0.95))",
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a ValueError lists the valid names otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown dispersive recipe {name!r}; valid recipes: {sorted(RECIPES)}")
    return RECIPES[name]


def resolve_block(recipe: str | Recipe, depth: int, prefix: str = "blocks") -> str:
    """The module path of the regularised block, e.g. ``"blocks.2"`` for "paper" at depth 12.

    Args:
        recipe: a recipe name or a :class:`Recipe`.
        depth: the number of blocks of the model.
        prefix: the module path of the block list (``"blocks"`` for SiT/DiT).

    Returns:
        ``f"{prefix}.{index}"`` with the 0-indexed block of the recipe's rule.
    """
    p = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if not isinstance(p, Recipe):
        raise TypeError(f"recipe must be a name or a Recipe; got {type(recipe).__name__}")
    index = p.block_index(depth)
    return f"{prefix}.{index}" if prefix else str(index)
