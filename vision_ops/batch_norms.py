"""Each BatchNorm folded into the convolution before it, as a fixed-size model loads
(`runtime.fold_batch_norm`).

In eval mode a BatchNorm is an affine map per channel (x * scale + shift, scale =
weight / sqrt(running_var + eps)), so one that reads a convolution's output folds into that
convolution: its weights scaled in place per output channel, its bias the shift. Each image
then makes one pass over the convolution's output, not two: ResNet-18 alone runs 10-15 % more
images a second on 2 CPU threads (docs/performance.md, "BatchNorm folded into the
convolutions").
`torch.compile` with freezing folds them too; this is for the eager model, which the driver's
predictor threads and every uncompiled actor run.

The pairs are found by running the model once on a probe batch with hooks on its own
convolutions and BatchNorms (each module's hooks are its own, so predictors that load in
threads beside one that predicts do not meet; torch.fx's tracing patches every module's call
while it traces). A BatchNorm folds where its one call reads the very tensor one
convolution's one call returned. The folded model then runs the probe again: where an output
moved by more than float rounding (the convolution's output was read elsewhere too), every
fold is undone and the model runs as it was loaded.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

log = logging.getLogger(__name__)

# The convolutions a BatchNorm folds into, by exact type (a subclass may change its weights
# in forward, as weight standardisation does), with the BatchNorm of their dimensions.
NORM_OF_CONV: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
# The largest change folding may make to the probe's output, as a share of its largest value:
# float32 rounding moves it by about 1e-6 of it.
AGREEMENT = 1e-3


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into its convolution, with what undoes it: the convolution's
    weights were scaled in place (no second copy of them held), its bias replaced."""

    conv: _ConvNd
    scale: torch.Tensor  # the weights' factor per output channel, none zero
    bias: torch.Tensor | None  # the convolution's own
    parent: nn.Module
    name: str  # the BatchNorm's attribute on its parent
    norm: _BatchNorm

    def undo(self) -> None:
        """The convolution and its BatchNorm back as they were (the weights to float
        rounding)."""
        self.conv.weight.div_(_per_output_channel(self.scale, self.conv.weight))
        self.conv.bias = self.bias
        setattr(self.parent, self.name, self.norm)


def fold_batch_norms(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    """Each eval-mode BatchNorm of `model` that reads only a convolution's output folded into
    that convolution, in place; how many were folded. `run` calls the model on a probe batch
    it takes and returns the output the predictions come from."""
    with torch.no_grad():
        pairs, before = _pairs_seen(model, run)
        if not pairs:
            return 0
        folds = [fold for conv, norm in pairs if (fold := _fold(model, conv, norm))]
        if not folds:
            return 0
        moved = _largest_change(before, run())
        if moved > AGREEMENT:
            for fold in reversed(folds):
                fold.undo()
            log.warning(
                "%s: its BatchNorms not folded: folding moved its output by %.2g of its "
                "largest value (a convolution's output is read elsewhere too)",
                type(model).__name__,
                moved,
            )
            return 0
    log.info("%s: %d BatchNorms folded into their convolutions", type(model).__name__, len(folds))
    return len(folds)


def _pairs_seen(
    model: nn.Module, run: Callable[[], torch.Tensor]
) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """The (convolution, BatchNorm) module names that fold, as the probe's one run showed
    them, and that run's output."""
    calls: Counter[str] = Counter()
    returned: dict[str, tuple[type, weakref.ref[torch.Tensor]]] = {}  # weak: freed, no match
    read_by: dict[str, list[str]] = {}  # a convolution's name: the BatchNorms that read it

    def conv_returned(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                returned[name] = (NORM_OF_CONV[type(module)], weakref.ref(output))

        return hook

    def norm_reads(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            calls[name] += 1
            for conv, (norm_type, output) in returned.items():
                if inputs and output() is inputs[0] and type(module) is norm_type:
                    read_by.setdefault(conv, []).append(name)

        return hook

    handles = []
    for name, module in model.named_modules():
        if type(module) in NORM_OF_CONV:
            handles.append(module.register_forward_hook(conv_returned(name)))
        elif type(module) in NORM_OF_CONV.values() and _folds(module):
            handles.append(module.register_forward_pre_hook(norm_reads(name)))
    try:
        output = run()
    finally:
        for handle in handles:
            handle.remove()
    pairs = [
        (conv, norms[0])
        for conv, norms in read_by.items()
        if len(norms) == 1 and calls[conv] == calls[norms[0]] == 1
    ]
    return pairs, output


def _folds(norm: nn.Module) -> bool:
    """Whether a BatchNorm is the affine map folding needs: in eval mode, with running
    statistics (one without normalises each batch by its own)."""
    return not norm.training and getattr(norm, "running_mean", None) is not None


def _fold(model: nn.Module, conv_name: str, norm_name: str) -> Fold | None:
    """The BatchNorm folded into the convolution, in place; None where a channel's factor is
    zero or not finite (a fold that could not be undone)."""
    conv = cast(_ConvNd, model.get_submodule(conv_name))
    norm = cast(_BatchNorm, model.get_submodule(norm_name))
    mean, variance = norm.running_mean, norm.running_var
    assert mean is not None and variance is not None  # `_folds` chose BatchNorms with them
    weight = conv.weight
    scale = torch.rsqrt(variance.float() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        return None
    shift = -mean.float() * scale
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    parent_name, _, name = norm_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    fold = Fold(conv, scale.to(weight.dtype), conv.bias, parent, name, norm)
    weight.mul_(_per_output_channel(fold.scale, weight))
    conv.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=weight.requires_grad)
    setattr(parent, name, nn.Identity())
    return fold


def _per_output_channel(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`values`, one per output channel, shaped to scale a convolution's weight."""
    return values.view(-1, *([1] * (weight.dim() - 1)))


def _largest_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """The largest change from `before` to `after`, as a share of `before`'s largest value;
    infinite where they differ in shape or one is not finite."""
    if before.shape != after.shape or not bool(torch.isfinite(after).all()):
        return float("inf")
    scale = float(before.abs().max()) or 1.0
    return float((after.float() - before.float()).abs().max()) / scale
