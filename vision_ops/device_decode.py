"""JPEG decoding and resizing on the predictor's device (nvJPEG on a GPU), falling back to the CPU.

Read tasks ship a photo's encoded bytes when `decode.device_jpeg_size` says the device can take
it (`runtime.decode: device`; decided there so read tasks never import torch). The predictor
decodes the batch in one call, resizes and crops it where the model runs, and only a file the
device refuses is decoded again on the CPU with Pillow. The geometry is torchvision's
`Resize(n)` + `CenterCrop(m)` on tensors (antialiased), so it matches the CPU path's
arithmetic; pixel values differ from Pillow's by rounding only.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from vision_ops.config import Preprocessing
from vision_ops.decode import DecodeError, decode_image

INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def model_inputs(
    payloads: Sequence[bytes],
    device: torch.device,
    max_pixels: int,
    spec: Preprocessing,
    threads: int,
) -> list[torch.Tensor | DecodeError]:
    """Each JPEG as the model's uint8 (crop, crop, 3) input on the device, or the DecodeError
    of a file no decoder can read. A GPU decodes the batch in one call; a CPU decodes and crops
    the files on `threads` threads at once (the model's cores, idle until the batch is ready)."""
    if device.type == "cpu" and threads > 1 and len(payloads) > 1:
        one_file = functools.partial(_model_input, device=device, max_pixels=max_pixels, spec=spec)
        return list(_decoders(threads).map(one_file, payloads))
    decoded = decode_batch(payloads, device, max_pixels)
    return [_cropped(image, spec) for image in decoded]


@functools.cache
def _decoders(threads: int) -> ThreadPoolExecutor:
    """This process's CPU decoding threads, started once and kept for every batch."""
    return ThreadPoolExecutor(threads, thread_name_prefix="decode")


def _model_input(
    payload: bytes, device: torch.device, max_pixels: int, spec: Preprocessing
) -> torch.Tensor | DecodeError:
    return _cropped(decode_batch([payload], device, max_pixels)[0], spec)


def _cropped(image: torch.Tensor | DecodeError, spec: Preprocessing) -> torch.Tensor | DecodeError:
    return resize_and_crop_tensor(image, spec) if isinstance(image, torch.Tensor) else image


def decode_batch(
    payloads: Sequence[bytes], device: torch.device, max_pixels: int
) -> list[torch.Tensor | DecodeError]:
    """Each JPEG as uint8 (3, H, W) on the device, decoded in one call; a batch the device
    refuses is retried file by file, and a file it refuses is decoded with Pillow on the CPU.
    A DecodeError where no decoder can read the file; none for none (a batch whose files the
    read tasks decoded or could not read: torchvision refuses an empty list)."""
    if not payloads:
        return []
    tensors = [torch.frombuffer(bytearray(payload), dtype=torch.uint8) for payload in payloads]
    try:
        return list(_decode_jpeg(tensors, device))
    except RuntimeError:  # nvJPEG returns nothing for a batch with one bad file
        return [
            _decode_one(tensor, payload, device, max_pixels)
            for tensor, payload in zip(tensors, payloads, strict=True)
        ]


def _decode_one(
    tensor: torch.Tensor, payload: bytes, device: torch.device, max_pixels: int
) -> torch.Tensor | DecodeError:
    try:
        return _decode_jpeg([tensor], device)[0]
    except RuntimeError:
        pass
    try:
        pixels = decode_image(payload, max_pixels)
    except DecodeError as err:
        return err
    return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


# torchvision 0.29 points its decoders' callers to torchcodec, not yet a dependency. Ignored
# for the process, once: `warnings.catch_warnings` around each decode is not safe for the
# decoding threads (it swaps the process's filters; one thread's exit drops another's).
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision are deprecated"
)


def _decode_jpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))


def resize_and_crop_tensor(image: torch.Tensor, spec: Preprocessing) -> torch.Tensor:
    """uint8 (3, H, W) -> (crop, crop, 3) uint8 on the same device: shorter side to
    `spec.resize`, then a centred crop (zero-padded where the image is smaller)."""
    resized = F.resize(
        image, [spec.resize], interpolation=INTERPOLATION[spec.interpolation], antialias=True
    )
    return F.center_crop(resized, [spec.crop, spec.crop]).permute(1, 2, 0)
