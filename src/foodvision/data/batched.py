"""Decoding and augmenting a whole batch of photos as tensor operations on the device that trains.

Loader workers then only read bytes (or slices of a decoded-photo cache); the decode, the random crop, the
flip, the ``seed`` preset's affine and the normalisation run here, batched, as CPU tensors on a CPU and as
CUDA tensors on a GPU: the same code, only the decode call and the device move differ.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.transforms import Preprocessing

# Presets done here exactly as foodvision.data.transforms.build_train_transform does them (in distribution);
# any other (randaugment) keeps the PIL path.
BATCHED_PRESETS = ("none", "crop", "seed", "light")

# A JPEG whose shorter side is at least this many times the working size goes to the fallback's draft decode
# (PIL decodes it scaled by 1/2, 1/4 or 1/8). On a CPU that beats a full decode plus resize from 2x (measured,
# working size 256: 640x480 1.3 ms full against 1.6 ms draft, 1024x768 2.5 against 2.1, 4000x3000 44 against
# 16). On CUDA nvJPEG is far faster than a serial CPU decode: only photos 8x too large leave it (not yet
# measured on a GPU).
DRAFT_FACTORS = {"cpu": 2, "cuda": 8}

# Uniform draws per photo, at fixed positions, so that each parameter comes from the same draw whatever the
# preset: [0:10) crop areas, [10:20) crop aspect ratios, 20-21 crop position, 22 flip, 23 angle,
# 24-25 translation, 26 zoom, 27 brightness, 28 saturation, 29 jitter order.
_DRAWS = 32

_JPEG_START = b"\xff\xd8\xff"
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _JpegHeader:
    width: int
    height: int
    components: int
    precision: int
    orientation: int


def _jpeg_header(payload: torch.Tensor) -> _JpegHeader | None:
    """Size, colour components, bit depth and EXIF orientation from a JPEG's markers (no decoding);
    ``None`` for anything that is not a JPEG this parser understands (it then takes the fallback)."""
    data = memoryview(payload.numpy())
    if len(data) < 4 or bytes(data[:3]) != _JPEG_START:
        return None
    orientation, offset = 1, 2
    try:
        while offset + 4 <= len(data):
            if data[offset] != 0xFF:
                return None
            marker = data[offset + 1]
            if marker == 0xFF:  # fill byte
                offset += 1
                continue
            (length,) = struct.unpack_from(">H", data, offset + 2)
            if marker == 0xE1 and bytes(data[offset + 4 : offset + 10]) == b"Exif\x00\x00":
                orientation = _exif_orientation(data[offset + 10 : offset + 2 + length])
            elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                precision, height, width, components = struct.unpack_from(">BHHB", data, offset + 4)
                return _JpegHeader(width, height, components, precision, orientation)
            elif marker == 0xDA:  # start of scan before any frame header
                return None
            offset += 2 + length
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _exif_orientation(tiff: memoryview) -> int:
    """The Orientation tag (0x0112) of IFD0 in an EXIF block (1, upright, when absent or unreadable)."""
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for entry in range(count):
        tag, _kind, _count, value = struct.unpack_from(order + "HHIH", tiff, ifd + 2 + 12 * entry)
        if tag == 0x0112:
            return value if 1 <= value <= 8 else 1
    return 1


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a CHW tensor, as ``PIL.ImageOps.exif_transpose`` does."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


def _batchable(header: _JpegHeader | None, draft: int | None, device: torch.device) -> bool:
    """Whether the batched JPEG decode gives what the fallback gives: an 8-bit YCbCr/RGB JPEG within PIL's
    pixel limit (larger ones are judged by load_rgb), not so much larger than the working size that a draft
    decode is cheaper."""
    if header is None or header.components != 3 or header.precision != 8:
        return False
    limit = Image.MAX_IMAGE_PIXELS
    if limit and header.width * header.height > limit:
        return False
    factor = DRAFT_FACTORS.get(device.type, DRAFT_FACTORS["cuda"])
    return draft is None or min(header.width, header.height) < factor * draft


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """All at once (nvJPEG on CUDA); when the batched call rejects the list, file by file, ``None`` for a
    file the decoder rejects (it then takes the fallback, which names it if it is really bad)."""
    try:
        return list(decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        for payload in payloads:
            try:
                decoded.append(decode_jpeg(payload, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def _decode_fallback(payload: torch.Tensor, name: str, draft: int | None) -> torch.Tensor:
    """Any image PIL reads (PNG, CMYK, grayscale, 16-bit, ...), as an RGB uint8 CHW tensor on the CPU."""
    size = (draft, draft) if draft else None
    try:
        image = load_rgb(io.BytesIO(payload.numpy().tobytes()), draft_size=size)  # type: ignore[arg-type]
    except BadImageError as error:
        raise BadImageError(name, error.reason) from error
    except Exception as error:  # noqa: BLE001 - whatever the decoder raises makes the file bad, as today
        raise BadImageError(name, f"{type(error).__name__}: {error}") from error
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # HWC in memory, as decode_jpeg gives


def decode_batch(
    payloads: Sequence[torch.Tensor],
    names: Sequence[str],
    device: torch.device | str = "cpu",
    draft: int | None = None,
    skip_bad: bool = False,
    on_bad: Callable[[BadImageError], None] | None = None,
) -> tuple[list[torch.Tensor], list[int]]:
    """Decode a batch of files to RGB uint8 CHW tensors on ``device``.

    ``payloads`` are 1-D uint8 CPU tensors of file bytes (``torchvision.io.read_file``, ``torch.frombuffer``);
    ``names`` name them in errors. Returns (the images, the positions in ``payloads`` of the images kept).
    8-bit colour JPEGs are decoded by one ``torchvision.io.decode_jpeg`` call on the whole list (nvJPEG when
    ``device`` is CUDA), EXIF orientation applied as tensor flips; anything else (PNG, CMYK, grayscale,
    16-bit, a JPEG the decoder rejects, a JPEG ``DRAFT_FACTORS[device.type]`` times the working size
    ``draft``) is decoded file by file on the CPU by :func:`foodvision.data.images.load_rgb`, reduced towards
    ``draft``. A file that cannot be decoded raises :class:`BadImageError` naming it, or with ``skip_bad`` is
    left out, after ``on_bad(error)`` (e.g. ``datasets.record_bad_image``, which logs it as today).
    """
    if len(payloads) != len(names):
        raise ValueError(f"decode_batch: {len(payloads)} payloads but {len(names)} names")
    device = torch.device(device)
    images: list[torch.Tensor | None] = [None] * len(payloads)
    headers = [_jpeg_header(payload) for payload in payloads]
    batched = [i for i, header in enumerate(headers) if _batchable(header, draft, device)]
    if batched:
        decoded = _decode_jpegs([payloads[i] for i in batched], device)
        for i, image in zip(batched, decoded, strict=True):
            if image is not None:
                header = headers[i]
                images[i] = _orient(image, header.orientation if header else 1)
    kept: list[int] = []
    for i, image in enumerate(images):
        if image is None:
            try:
                image = _decode_fallback(payloads[i], names[i], draft).to(device, non_blocking=True)
            except BadImageError as error:
                if not skip_bad:
                    raise
                if on_bad is not None:
                    on_bad(error)
                continue
            images[i] = image
        kept.append(i)
    return [images[i] for i in kept], kept  # type: ignore[misc]


# --------------------------------------------------------------------------------------------- random draws


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a pure, well-mixed function of (seed, epoch, index)."""
    value = 0
    for part in (seed, epoch, index):
        value = _splitmix64(value ^ (int(part) & _MASK64))
    return value


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of photo ``index``'s draws in ``epoch``: a pure function of (seed, epoch, index), so a
    resumed run gets the same crops as an uninterrupted one, whatever the worker and batch layout."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, index))
    return generator


def _draws(indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """[B, _DRAWS] float64 uniforms in [0, 1), row b from ``sample_generator(seed, epoch, indices[b])``."""
    rows = [
        torch.rand(_DRAWS, generator=sample_generator(seed, epoch, int(index)), dtype=torch.float64)
        for index in indices.tolist()
    ]
    return torch.stack(rows) if rows else torch.zeros(0, _DRAWS, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- geometry


def crop_boxes(
    sizes: Sequence[tuple[int, int]],
    draws: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> list[tuple[int, int, int, int]]:
    """``RandomResizedCrop``'s boxes (top, left, height, width) for images of ``sizes`` (height, width), from
    ``draws`` [B, >=21] uniforms: the same algorithm as torchvision (10 tries, then the centre crop)."""
    boxes = []
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for (height, width), row in zip(sizes, draws.tolist(), strict=True):
        area = height * width
        box = None
        for attempt in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * row[attempt])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * row[10 + attempt])
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(row[20] * (height - h + 1))
                left = int(row[21] * (width - w + 1))
                box = (top, left, h, w)
                break
        if box is None:
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, int(round(width / min(ratio)))
            elif in_ratio > max(ratio):
                w, h = int(round(height * max(ratio))), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        boxes.append(box)
    return boxes


def affine_batch(
    images: torch.Tensor,
    angles: torch.Tensor,
    translations: torch.Tensor,
    scales: torch.Tensor,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mirror (where ``flips``), then rotate (degrees, counter-clockwise), translate (pixels, [B, 2] as x, y)
    and scale each image of a float batch [B, C, H, W] about its centre, bilinear, zeros outside:
    torchvision's ``hflip`` and ``affine`` (no shear) for every sample in one ``grid_sample`` call."""
    batch, _, height, width = images.shape
    device, dtype = images.device, images.dtype if images.is_floating_point() else torch.float32
    radians = torch.deg2rad(angles.to(torch.float64))
    cos, sin = torch.cos(radians) / scales.to(torch.float64), torch.sin(radians) / scales.to(torch.float64)
    # Inverse map in pixels about the centre: input = M (output - t), M = [[cos, sin], [-sin, cos]] / scale;
    # in grid_sample's units (-1..1 on each side); a mirror negates the input's x.
    tx, ty = translations[:, 0].to(torch.float64), translations[:, 1].to(torch.float64)
    half_w, half_h = width / 2, height / 2
    theta = torch.stack(
        [
            torch.stack([cos, sin * half_h / half_w, (-cos * tx - sin * ty) / half_w], dim=1),
            torch.stack([-sin * half_w / half_h, cos, (sin * tx - cos * ty) / half_h], dim=1),
        ],
        dim=1,
    )
    if flips is not None:
        theta[:, 0] *= torch.where(flips.cpu(), -1.0, 1.0).to(torch.float64)[:, None]
    theta = theta.to(device=device, dtype=dtype)[:, None, None, :, :]  # [B, 1, 1, 2 (x, y), 3]
    # affine_grid's grid (pixel centres) by two broadcast multiply-adds: 4x faster on a CPU than its bmm
    xs = torch.linspace(-1 + 1 / width, 1 - 1 / width, width, device=device, dtype=dtype)[None, None, :, None]
    ys = torch.linspace(-1 + 1 / height, 1 - 1 / height, height, device=device, dtype=dtype)[
        None, :, None, None
    ]
    grid = torch.addcmul(torch.addcmul(theta[..., 2], ys, theta[..., 1]), xs, theta[..., 0])  # [B, H, W, 2]
    return F.grid_sample(images.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter_batch(
    images: torch.Tensor, brightness: torch.Tensor, saturation: torch.Tensor, brightness_first: torch.Tensor
) -> torch.Tensor:
    """torchvision's ``adjust_brightness`` and ``adjust_saturation`` with per-sample factors [B], in the order
    ``brightness_first`` [B] says, on a float RGB batch in 0-1 (in place; returned)."""
    factors = torch.stack([brightness, saturation], dim=1).to(device=images.device, dtype=images.dtype)
    for first in (True, False):
        rows = torch.nonzero(brightness_first.cpu() == first).flatten().to(images.device)
        if len(rows) == 0:
            continue
        part = images.index_select(0, rows)
        bright, saturate = (factors[rows, i, None, None, None] for i in (0, 1))
        if first:
            part.mul_(bright).clamp_(0, 1)
        gray = torch.mul(part[:, 0:1], 0.2989).add_(part[:, 1:2], alpha=0.587).add_(part[:, 2:3], alpha=0.114)
        part.mul_(saturate).add_(gray.mul_(1 - saturate)).clamp_(0, 1)
        if not first:
            part.mul_(bright).clamp_(0, 1)
        images.index_copy_(0, rows, part)
    return images


# --------------------------------------------------------------------------------------------- the transform


@dataclass(frozen=True)
class BatchedTransform:
    """The train or eval transform of :mod:`foodvision.data.transforms` as batched tensor operations.

    ``kind`` is ``eval`` (resize the shorter side, centre crop), ``crop`` (random resized crop + flip) or
    ``affine`` (the ``seed``/``light`` presets: resize, centre crop, flip, rotation/zoom/shift, and for
    ``light`` brightness/saturation jitter). The random draws of each photo come from
    :func:`sample_generator` (seed, epoch, photo index): the same photo gets the same view whatever batch it
    is in; the distribution is that of the PIL path, not its exact draws.
    """

    pre: Preprocessing
    kind: str = "eval"
    min_scale: float = 0.35
    hflip: bool = True
    rotation: float = 0.0
    zoom: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    saturation: float = 0.0

    @staticmethod
    def supports(augment: Mapping[str, Any] | None) -> bool:
        """Whether the preset is one done here exactly (in distribution); otherwise keep the PIL path."""
        return dict(augment or {}).get("name", "none") in BATCHED_PRESETS

    @classmethod
    def from_config(
        cls, pre: Preprocessing, augment: Mapping[str, Any] | None, train: bool
    ) -> BatchedTransform:
        """What ``build_train_transform(pre, augment)`` (``train``) or ``pre.eval_transform()`` does."""
        augment = dict(augment or {"name": "none"})
        name = augment.get("name", "none")
        if not train or name == "none":
            return cls(pre)
        if not cls.supports(augment):
            raise ValueError(
                f"augment preset {name!r} has no batched tensor version (it has: {BATCHED_PRESETS}); "
                "use the PIL data path for it"
            )
        if name == "crop":
            return cls(pre, kind="crop", min_scale=float(augment.get("min_scale", 0.35)))
        jitter = name == "light"
        return cls(
            pre,
            kind="affine",
            hflip=bool(augment.get("hflip", True)),
            rotation=float(augment.get("rotation", 36.0)),
            zoom=float(augment.get("zoom", 0.2)),
            translate=float(augment.get("translate", 0.2)),
            brightness=float(augment.get("brightness", 0.2)) if jitter else 0.0,
            saturation=float(augment.get("saturation", 0.2)) if jitter else 0.0,
        )

    @property
    def random(self) -> bool:
        return self.kind != "eval"

    def __call__(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        indices: torch.Tensor | Sequence[int] | None = None,
        epoch: int = 0,
        seed: int = 0,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> torch.Tensor:
        """uint8 RGB images (a list of CHW tensors of any size, or a [B, 3, H, W] tensor) to a float32
        [B, 3, S, S] batch normalised with ``pre.mean``/``pre.std``. A random transform needs the photos'
        dataset ``indices``, the ``epoch`` and the run's ``seed``; the result is a function of those."""
        count = len(images)
        if count == 0:
            raise ValueError("BatchedTransform: empty batch")
        draws = None
        if self.random:
            if indices is None:
                raise ValueError("BatchedTransform: a random transform needs the photos' indices")
            indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
            if len(indices) != count:
                raise ValueError(f"BatchedTransform: {count} images but {len(indices)} indices")
            draws = _draws(indices, epoch, seed)
        if self.kind == "crop":
            assert draws is not None
            batch = self._random_crops(images, draws)
        else:
            batch = self._resize_crop(images)
        flips = draws[:, 22] < 0.5 if draws is not None and self.hflip else None
        if self.kind == "affine":
            assert draws is not None
            batch = self._affine(batch.to(torch.float32), draws, flips)  # 0-255: bilinear and zeros commute
            scale = 1 / 255
            if self.brightness or self.saturation:
                batch, scale = self._jitter(batch.div_(255.0), draws), 1.0
            return self._normalise(batch.contiguous(memory_format=memory_format), scale=scale)
        if flips is not None:
            flips = flips.to(batch.device)[:, None, None, None]
            batch = torch.where(flips, batch.flip(-1), batch)
        return self._normalise(batch.contiguous(memory_format=memory_format), scale=1 / 255)

    def _resize_crop(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The eval geometry: shorter side to ``resize_size`` (antialiased), centre crop; uint8 [B,3,S,S]."""
        pre = self.pre
        interpolation = pre.interpolation_mode

        def one(image: torch.Tensor) -> torch.Tensor:
            image = TF.resize(image, [pre.resize_size], interpolation=interpolation, antialias=True)
            return TF.center_crop(image, [pre.image_size])

        if isinstance(images, torch.Tensor):
            return one(images)
        return _stack([one(image) for image in images], pre.image_size)

    def _random_crops(
        self, images: Sequence[torch.Tensor] | torch.Tensor, draws: torch.Tensor
    ) -> torch.Tensor:
        """RandomResizedCrop per photo (antialiased resize of each box); uint8 [B, 3, S, S]."""
        size = [self.pre.image_size, self.pre.image_size]
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        boxes = crop_boxes(sizes, draws, (self.min_scale, 1.0))
        crops = [
            TF.resized_crop(
                image, top, left, h, w, size, interpolation=self.pre.interpolation_mode, antialias=True
            )
            for image, (top, left, h, w) in zip(images, boxes, strict=True)
        ]
        return _stack(crops, self.pre.image_size)

    def _affine(self, batch: torch.Tensor, draws: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """``RandomHorizontalFlip`` then ``RandomAffine(degrees=rotation, translate=(t, t),
        scale=(1 - zoom, 1 + zoom))`` per photo, as torchvision draws them."""
        height, width = batch.shape[-2:]
        angles = self.rotation * (2 * draws[:, 23] - 1)
        shifts = torch.stack(
            [
                torch.round(self.translate * width * (2 * draws[:, 24] - 1)),
                torch.round(self.translate * height * (2 * draws[:, 25] - 1)),
            ],
            dim=1,
        )
        scales = (1 - self.zoom) + 2 * self.zoom * draws[:, 26]
        return affine_batch(batch, angles, shifts, scales, flips)

    def _jitter(self, batch: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """``ColorJitter(brightness, saturation)`` per photo, in a random order per photo, as torchvision."""
        brightness = (1 - self.brightness) + 2 * self.brightness * draws[:, 27]
        saturation = (1 - self.saturation) + 2 * self.saturation * draws[:, 28]
        return jitter_batch(batch, brightness, saturation, draws[:, 29] < 0.5)

    def _normalise(self, batch: torch.Tensor, scale: float) -> torch.Tensor:
        """float32 ``(batch * scale - mean) / std``, in the batch's memory format, one pass after the cast."""
        device = batch.device
        mean = torch.tensor(self.pre.mean, dtype=torch.float64)
        std = torch.tensor(self.pre.std, dtype=torch.float64)
        factor = (scale / std).to(device=device, dtype=torch.float32)[None, :, None, None]
        offset = (-mean / std).to(device=device, dtype=torch.float32)[None, :, None, None]
        return batch.to(torch.float32).mul_(factor).add_(offset)


def _stack(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """uint8 [B, 3, size, size] from CHW crops, channels_last: decoded photos are HWC in memory, so this is
    a plain copy (``torch.stack`` into NCHW is a strided gather, 30-100x slower on a CPU)."""
    out = torch.empty(
        len(images),
        3,
        size,
        size,
        dtype=torch.uint8,
        device=images[0].device,
        memory_format=torch.channels_last,
    )
    for position, image in enumerate(images):
        out[position].copy_(image)
    return out
