"""Each BatchNorm folded into the convolution before it, as a fixed-size model loads
(`runtime.fold_batch_norm`).

In eval mode a BatchNorm is an affine map per channel (x * scale + shift, scale =
weight / sqrt(running_var + eps)), so one that reads a convolution's output folds into that
convolution: its weights scaled in place per output channel, its bias the shift (by hand,
not torch's `fuse_conv_bn_weights`, which makes new weights and cannot be undone). Each image
then makes one pass over the convolution's output, not two (what it buys:
docs/performance.md, "BatchNorm folded into the convolutions"). `torch.compile` with freezing
folds them too; this is for the eager model, which the driver's predictor threads and every
uncompiled actor run.

The pairs are found by running the model once on a probe batch with hooks on its own
convolutions and BatchNorms (each module's hooks are its own, so predictors that load in
threads beside one that predicts do not meet; torch.fx's tracing patches every module's call
while it traces). A BatchNorm folds where its one call reads, unchanged, the very tensor one
convolution's one call returned, neither module is registered twice and the convolution's
weights are its own. The folded model then runs the probe again: where that fails, or moves
the output by more than float32 rounding, every fold is undone and the model runs as loaded.
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
# The largest change folding may make to the probe's output (float32, on the CPU), as a
# share of its largest value: float32 rounding, with a margin (what it moved by in six model
# families: docs/performance.md, "BatchNorm folded into the convolutions").
AGREEMENT = 1e-5


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
    it takes (float32, on the CPU, where a fold's rounding is known) and returns the output
    the predictions come from. A model that fails on the probe, or gives an output a change
    cannot be measured on (not finite, or all zero), is left as it is."""
    name = type(model).__name__
    if not any(type(module) in NORM_OF_CONV.values() for module in model.modules()):
        return 0  # none to fold (ViT, ConvNeXt, Swin): no probe run
    with torch.no_grad():
        try:
            pairs, before = _pairs_seen(model, run)
        except Exception as err:  # the model's own checks report it, unfolded
            log.info("%s: BatchNorms not folded: the model failed on the probe: %s", name, err)
            return 0
        if pairs and not _measurable(before):
            log.info("%s: BatchNorms not folded: the probe's output is not finite or is 0", name)
            return 0
        folds = [fold for conv, norm in pairs if (fold := _fold(model, conv, norm))]
        if not folds:
            return 0
        failed = _disagreement(before, run)
        if failed:
            for fold in reversed(folds):
                fold.undo()
            log.warning(
                "%s: BatchNorms not folded: %s (a convolution's output read elsewhere too, "
                "or a BatchNorm's parameters read directly)",
                name,
                failed,
            )
            return 0
    log.info("%s: %d BatchNorms folded into their convolutions", name, len(folds))
    return len(folds)


def _pairs_seen(
    model: nn.Module, run: Callable[[], torch.Tensor]
) -> tuple[list[tuple[str, str]], torch.Tensor]:
    """The (convolution, BatchNorm) module names that fold, as the probe's one run showed
    them, and that run's output."""
    calls: Counter[str] = Counter()
    # each convolution's output as it returned it: weak (a freed tensor matches none), with
    # its version (an in-place change after it, a ReLU(inplace=True), moves it)
    returned: dict[str, tuple[type, weakref.ref[torch.Tensor], int]] = {}
    read_by: dict[str, list[str]] = {}  # a convolution's name: the BatchNorms that read it

    def conv_returned(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                norm_type = NORM_OF_CONV[type(module)]
                returned[name] = (norm_type, weakref.ref(output), output._version)

        return hook

    def norm_reads(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            calls[name] += 1
            read = inputs[0] if inputs else None
            if not isinstance(read, torch.Tensor):
                return
            for conv, (norm_type, output, version) in returned.items():
                if output() is read and read._version == version and type(module) is norm_type:
                    read_by.setdefault(conv, []).append(name)

        return hook

    handles = []
    for name, module in _named_once(model).items():
        if type(module) in NORM_OF_CONV and _weights_own(model, module):
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


def _named_once(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules registered under one name only, by name: replacing a BatchNorm
    under one name of two would leave it under the other."""
    names = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    return {name: module for name, module in model.named_modules() if names[id(module)] == 1}


def _weights_own(model: nn.Module, conv: nn.Module) -> bool:
    """Whether a convolution's weight is its own: scaling a weight another module shares
    would change that module too."""
    weight = cast(_ConvNd, conv).weight
    holders = sum(p is weight for _, p in model.named_parameters(remove_duplicate=False))
    return holders == 1


def _folds(norm: nn.Module) -> bool:
    """Whether a BatchNorm is the affine map folding needs: in eval mode, with running
    statistics (one without normalises each batch by its own)."""
    return not norm.training and getattr(norm, "running_mean", None) is not None


def _fold(model: nn.Module, conv_name: str, norm_name: str) -> Fold | None:
    """The BatchNorm folded into the convolution, in place; None where a channel's factor,
    in the weights' own dtype, is zero or not finite (a fold that could not be undone)."""
    conv = cast(_ConvNd, model.get_submodule(conv_name))
    norm = cast(_BatchNorm, model.get_submodule(norm_name))
    mean, variance = norm.running_mean, norm.running_var
    assert mean is not None and variance is not None  # `_folds` chose BatchNorms with them
    weight = conv.weight
    factor = torch.rsqrt(variance.float() + norm.eps)
    if norm.weight is not None:
        factor = factor * norm.weight.float()
    scale = factor.to(weight.dtype)
    if not bool(torch.isfinite(scale).all()) or bool((scale == 0).any()):
        return None
    shift = -mean.float() * factor
    if conv.bias is not None:
        shift = shift + conv.bias.float() * factor
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    parent_name, _, name = norm_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    fold = Fold(conv, scale, conv.bias, parent, name, norm)
    weight.mul_(_per_output_channel(scale, weight))
    conv.bias = nn.Parameter(shift.to(weight.dtype), requires_grad=weight.requires_grad)
    setattr(parent, name, nn.Identity())
    return fold


def _per_output_channel(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`values`, one per output channel, shaped to scale a convolution's weight."""
    return values.view(-1, *([1] * (weight.dim() - 1)))


def _measurable(output: torch.Tensor) -> bool:
    """Whether a change to the probe's output can be told from rounding: finite, not all 0."""
    return bool(torch.isfinite(output).all()) and bool(output.abs().max() > 0)


def _disagreement(before: torch.Tensor, run: Callable[[], torch.Tensor]) -> str | None:
    """Why the folded model's probe output is not the unfolded one's `before`; None where it
    is, to float32 rounding (`AGREEMENT`)."""
    try:
        after = run()
    except Exception as err:
        return f"the folded model failed on the probe ({type(err).__name__}: {err})"
    if after.shape != before.shape or not bool(torch.isfinite(after).all()):
        return "the folded model's probe output changed shape or is not finite"
    moved = float((after.float() - before.float()).abs().max() / before.abs().max())
    if moved > AGREEMENT:
        return f"folding moved the probe's output by {moved:.2g} of its largest value"
    return None
