"""BatchNorms folded into their convolutions as a fixed-size model loads: the same outputs,
what does not fold left as it is, a fold that would move the outputs undone, and a
classifier's predictions with folding on as with it off."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
import torchvision
from test_models import (
    CLASSES,
    direct_logits,
    spec_for,
    tiny_classifier,
    torchvision_file_model,
)
from torch import nn

from vision_ops.batch_norms import fold_batch_norms
from vision_ops.predictors import Classifier


def with_spread_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """`model` in eval mode, its BatchNorms given running statistics and affine parameters
    far from the identity (fresh ones fold into almost no change)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                size = module.num_features
                if module.track_running_stats:
                    module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                    module.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) - 0.5)
    return model.eval()


def batch_norms(model: nn.Module) -> int:
    return sum(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def probe_of(model: nn.Module, *shape: int) -> tuple[torch.Tensor, object]:
    probe = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return probe, lambda: model(probe)


def test_every_batch_norm_of_a_resnet_folds_and_its_outputs_stay() -> None:
    model = with_spread_statistics(torchvision.models.resnet18(num_classes=10))
    inputs = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(inputs)
    _, run = probe_of(model, 1, 3, 64, 64)
    assert fold_batch_norms(model, run) == 20
    assert batch_norms(model) == 0
    assert isinstance(model, torchvision.models.ResNet)  # its own class and forward kept
    assert isinstance(model.layer1[0].bn1, nn.Identity)
    assert model.layer1[0].conv1.bias is not None  # the BatchNorm's shift, now its bias
    with torch.no_grad():
        after = model(inputs)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


class ConvNorm(nn.Module):
    """A convolution of 3 channels to 3 and a BatchNorm of them; each subclass wires them in
    its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)


class ReadTwice(ConvNorm):
    """A convolution's output read by its BatchNorm and added after it as well: folding
    would change the sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.norm(y) + y


class SharedConv(ConvNorm):
    """One convolution called twice, a BatchNorm after one call: folding into it would change
    the other call too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(self.conv(x)))


class StandardisedConv(nn.Conv2d):
    """A convolution that changes its weights in forward: not a plain Conv2d to fold into."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, weight, self.bias)


def without_running_statistics() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))


class NormTwice(ConvNorm):
    """A BatchNorm registered under two names, called under the second: replacing it under
    the first would leave it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.alias = self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alias(self.conv(x))


class TiedWeights(ConvNorm):
    """Two convolutions that share one weight, a BatchNorm after one: scaling the weight in
    place would change the other."""

    def __init__(self) -> None:
        super().__init__()
        self.twin = nn.Conv2d(3, 3, 3, padding=1)
        self.twin.weight = self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.twin(self.norm(self.conv(x)))


@pytest.mark.parametrize(
    "model",
    [
        SharedConv(),
        nn.Sequential(StandardisedConv(3, 4, 3), nn.BatchNorm2d(4)),
        without_running_statistics(),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),  # not the conv's output
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(4)),  # changed
        NormTwice(),
        TiedWeights(),
    ],
    ids=[
        "conv-called-twice",
        "conv-subclass",
        "no-running-statistics",
        "norm-after-relu",
        "norm-after-inplace-relu",
        "norm-under-two-names",
        "tied-weights",
    ],
)
def test_what_does_not_fold_is_left_as_it_is(
    model: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    """Never folded, so never undone: no warning, the outputs exactly the same."""
    model = with_spread_statistics(model)
    probe, run = probe_of(model, 1, 3, 8, 8)
    with torch.no_grad():
        before = model(probe)
    with caplog.at_level(logging.WARNING, logger="vision_ops.batch_norms"):
        assert fold_batch_norms(model, run) == 0
    assert caplog.text == ""
    assert batch_norms(model) == 1
    with torch.no_grad():
        assert torch.equal(model(probe), before)


def test_a_pair_that_does_not_fold_leaves_the_others_folding() -> None:
    model = with_spread_statistics(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=True),  # its own bias, folded with the shift
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3),
            nn.ReLU(inplace=True),  # changes the second convolution's output in place
            nn.BatchNorm2d(4),
        )
    )
    probe, run = probe_of(model, 2, 3, 12, 12)
    with torch.no_grad():
        before = model(probe)
    assert fold_batch_norms(model, run) == 1
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.BatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(model(probe), before, rtol=1e-5, atol=1e-5)


class ReadsItsNorm(ConvNorm):
    """A model that reads its BatchNorm's weight directly (as some attention blocks do): it
    fails once the BatchNorm is an Identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)) * self.norm.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize(
    ("model_class", "why"),
    [
        (ReadTwice, "folding moved the probe's output by"),
        (ReadsItsNorm, "the folded model failed on the probe (AttributeError"),
    ],
)
def test_a_fold_the_check_refuses_is_undone(
    model_class: type[ConvNorm], why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Folded, then given back as loaded: the same modules and parameters, the weights
    scaled back (to float rounding), and a warning saying why."""
    model = with_spread_statistics(model_class())
    weight, bias, norm = model.conv.weight, model.conv.bias, model.norm
    probe, run = probe_of(model, 1, 3, 8, 8)
    with torch.no_grad():
        before = model(probe)
    with caplog.at_level(logging.WARNING, logger="vision_ops.batch_norms"):
        assert fold_batch_norms(model, run) == 0
    assert f"BatchNorms not folded: {why}" in caplog.text
    assert model.conv.weight is weight and model.conv.bias is bias and model.norm is norm
    with torch.no_grad():
        torch.testing.assert_close(model(probe), before, rtol=1e-6, atol=1e-6)


class Silenced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) * 0.0


def test_a_probe_output_no_change_shows_on_is_not_folded() -> None:
    """An output of zeros (or NaN) would hide any change a fold made."""
    model = with_spread_statistics(Silenced())
    _, run = probe_of(model, 1, 3, 8, 8)
    assert fold_batch_norms(model, run) == 0
    assert batch_norms(model) == 1


def test_a_batch_norm_that_zeroes_a_channel_is_left_as_it_is() -> None:
    """A channel the BatchNorm scales by zero: its fold could not be undone (the weights
    scaled back), so it is not made."""
    model = with_spread_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].weight[2] = 0.0
    _, run = probe_of(model, 1, 3, 8, 8)
    assert fold_batch_norms(model, run) == 0
    assert batch_norms(model) == 1


def test_folding_in_one_thread_leaves_a_model_predicting_in_another_alone() -> None:
    """Predictors load in threads beside one that predicts (`runtime.predict_in: driver`):
    the fold's hooks are its model's own, so the other model's calls neither fail nor
    change."""
    predicting = with_spread_statistics(torchvision.models.resnet18(num_classes=10), seed=3)
    inputs = torch.randn((1, 3, 32, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = predicting(inputs)
    outputs: list[torch.Tensor] = []
    stop = threading.Event()

    def predict() -> None:
        with torch.no_grad():
            while not stop.is_set():
                outputs.append(predicting(inputs))

    thread = threading.Thread(target=predict)
    thread.start()
    try:
        for seed in range(3):
            loading = with_spread_statistics(torchvision.models.resnet18(num_classes=10), seed)
            _, run = probe_of(loading, 1, 3, 32, 32)
            assert fold_batch_norms(loading, run) == 20
    finally:
        stop.set()
        thread.join()
    assert outputs and all(torch.equal(output, expected) for output in outputs)


@pytest.mark.parametrize("fold", [True, False])
def test_a_classifier_predicts_alike_folded_or_not(tmp_path, fold: bool) -> None:
    images = np.random.default_rng(5).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    weights = tmp_path / "spread.pt"
    torch.save(with_spread_statistics(tiny_classifier()).state_dict(), weights)
    reference = with_spread_statistics(tiny_classifier())
    spec = spec_for(torchvision_file_model(weights), top_k=3)
    runtime = spec.runtime.model_copy(update={"fold_batch_norm": fold})  # type: ignore[attr-defined]
    classifier = Classifier(spec.model_copy(update={"runtime": runtime}))  # type: ignore[attr-defined]
    assert batch_norms(classifier.module) == (0 if fold else batch_norms(reference))
    ids, scores = classifier.predict(images)
    expected = direct_logits(reference, images).softmax(-1).topk(3)
    np.testing.assert_array_equal(ids, expected.indices.numpy())
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)
    assert classifier.num_classes == CLASSES


def test_a_model_without_batch_norms_is_not_run_on_a_probe() -> None:
    """ViT, ConvNeXt, Swin: nothing to fold, so no probe run at load."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]))
    runs: list[torch.Tensor] = []
    probe = torch.zeros((1, 3, 8, 8))

    def run() -> torch.Tensor:
        runs.append(model(probe))
        return runs[-1]

    assert fold_batch_norms(model, run) == 0
    assert runs == []
