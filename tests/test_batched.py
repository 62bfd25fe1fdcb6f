"""The batched tensor data path (issue #22): decode a batch of files and apply the train or eval transform as
tensor operations; the deterministic parts match the PIL path, the random ones are a function of
(seed, epoch, photo index) and keep shape, range and per-sample independence."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from foodvision.data.batched import (
    BatchedTransform,
    affine_batch,
    crop_boxes,
    decode_batch,
    jitter_batch,
    sample_generator,
)
from foodvision.data.images import BadImageError, load_rgb
from foodvision.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

FOOD101_MINI = Path("/work/shared/data/food101-mini/food-101/images")
PRE = Preprocessing(image_size=96, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)
# Normalised units: one 8-bit level is 1 / 255 / std, about 0.017; the resamplers of PIL and torch differ by
# at most 2 levels on a few pixels (measured: mean 2e-4, max 0.035 on food-101 photos and generated JPEGs).
MEAN_TOLERANCE, MAX_TOLERANCE = 1e-3, 0.045


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth, photo-like content with edges (a low-resolution noise image upsampled)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )


def _payload(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _reference(data: bytes, draft: int | None = None) -> torch.Tensor:
    """What the PIL path decodes: load_rgb, as a CHW uint8 tensor."""
    size = (draft, draft) if draft else None
    image = load_rgb(io.BytesIO(data), draft_size=size)  # type: ignore[arg-type]
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    """Generated JPEGs of several sizes and aspects, and a handful of real food-101 photos when present."""
    files = {
        f"generated-{w}x{h}.jpg": _jpeg(_photo(w, h, seed))
        for seed, (w, h) in enumerate([(150, 110), (97, 160), (128, 128)])
    }
    real = sorted(FOOD101_MINI.glob("*/*.jpg"))[::1000][:5] if FOOD101_MINI.is_dir() else []
    files.update({str(path): path.read_bytes() for path in real})
    return files


@pytest.fixture(scope="module")
def odd_files() -> dict[str, bytes]:
    """Files the batched JPEG decode does not take: each must come out of the fallback as RGB uint8."""
    photo = _photo(80, 60)
    sixteen = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "rgb.png": _png(photo),
        "rgba.png": _png(photo.convert("RGBA")),
        "palette.png": _png(photo.convert("P")),
        "gray.jpg": _jpeg(photo.convert("L")),
        "cmyk.jpg": _jpeg(photo.convert("CMYK")),
        "sixteen-bit.png": _png(sixteen),
        "progressive.jpg": _jpeg(photo, progressive=True),
    }


def _decode(files: dict[str, bytes], **options: object) -> tuple[list[torch.Tensor], list[int]]:
    payloads = [_payload(data) for data in files.values()]
    return decode_batch(payloads, list(files), **options)  # type: ignore[arg-type]


def test_decode_gives_what_load_rgb_gives(photos: dict[str, bytes], odd_files: dict[str, bytes]) -> None:
    files = {**photos, **odd_files}
    images, kept = _decode(files)
    assert kept == list(range(len(files)))
    for name, data, image in zip(files, files.values(), images, strict=True):
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.device.type == "cpu", name
        reference = _reference(data)
        assert image.shape == reference.shape, name
        assert int((image.int() - reference.int()).abs().max()) <= 1, name


@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_applies_the_exif_orientation(orientation: int) -> None:
    photo = _photo(64, 40)
    exif = photo.getexif()
    exif[0x0112] = orientation
    data = _jpeg(photo, exif=exif.tobytes())
    (image,), _ = decode_batch([_payload(data)], ["rotated.jpg"])
    reference = _reference(data)
    assert image.shape == reference.shape
    assert int((image.int() - reference.int()).abs().max()) <= 1


def test_large_photos_are_decoded_reduced() -> None:
    """A JPEG far larger than the working size takes the draft decode: the size load_rgb's draft gives."""
    data = _jpeg(_photo(1000, 760))
    (image,), _ = decode_batch([_payload(data)], ["big.jpg"], draft=120)
    reference = _reference(data, draft=120)
    assert image.shape == reference.shape and min(image.shape[1:]) >= 120 and image.shape[2] <= 500
    (full,), _ = decode_batch([_payload(data)], ["big.jpg"])
    assert full.shape[1:] == (760, 1000)


def test_a_bad_file_in_a_batch_is_named_or_skipped(photos: dict[str, bytes]) -> None:
    good = list(photos.values())[:2]
    truncated = good[0][: len(good[0]) // 2]
    payloads = [_payload(good[0]), _payload(truncated), _payload(b"not an image"), _payload(good[1])]
    names = ["a.jpg", "dir/truncated.jpg", "dir/text.jpg", "b.jpg"]
    with pytest.raises(BadImageError) as raised:
        decode_batch(payloads, names)
    assert raised.value.path == "dir/truncated.jpg" and "dir/truncated.jpg" in str(raised.value)
    with pytest.raises(BadImageError, match="dir/text.jpg"):
        decode_batch(payloads[2:], names[2:])
    skipped: list[BadImageError] = []
    images, kept = decode_batch(payloads, names, skip_bad=True, on_bad=skipped.append)
    assert kept == [0, 3] and len(images) == 2
    assert [error.path for error in skipped] == names[1:3] and "truncated" in skipped[0].reason
    assert torch.equal(images[1], _reference(good[1]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("size", "crop_pct"), [(96, 0.875), (64, 1.0)])
def test_eval_transform_matches_the_pil_path(
    photos: dict[str, bytes], interpolation: str, size: int, crop_pct: float
) -> None:
    pre = Preprocessing(size, IMAGENET_MEAN, IMAGENET_STD, interpolation, crop_pct)
    images, _ = _decode(photos)
    batch = BatchedTransform.from_config(pre, {"name": "none"}, train=True)(images)
    reference = torch.stack([pre.eval_transform()(load_rgb(io.BytesIO(data))) for data in photos.values()])
    assert batch.dtype == torch.float32 and batch.shape == reference.shape == (len(photos), 3, size, size)
    difference = (batch - reference).abs()
    assert float(difference.mean()) < MEAN_TOLERANCE and float(difference.max()) < MAX_TOLERANCE


def test_a_batch_tensor_and_channels_last_give_the_same_batch(photos: dict[str, bytes]) -> None:
    images, _ = _decode(photos)
    same_size = [TF.center_crop(TF.resize(image, [120], antialias=True), [120]) for image in images]
    for train, augment in [(False, None), (True, {"name": "seed"}), (True, {"name": "crop"})]:
        transform = BatchedTransform.from_config(PRE, augment, train)
        indices = torch.arange(len(images))
        from_list = transform(same_size, indices, epoch=1, seed=3)
        from_tensor = transform(torch.stack(same_size), indices, epoch=1, seed=3)
        channels_last = transform(same_size, indices, 1, 3, memory_format=torch.channels_last)
        assert torch.allclose(from_list, from_tensor, atol=1e-5)
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(channels_last, from_list)


def _bounds(pre: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
    return (0 - mean) / std - 1e-5, (1 - mean) / std + 1e-5


@pytest.mark.parametrize("preset", ["crop", "seed", "light"])
def test_random_presets_keep_shape_range_and_per_sample_independence(
    photos: dict[str, bytes], preset: str
) -> None:
    images, _ = _decode(photos)
    transform = BatchedTransform.from_config(PRE, {"name": preset}, train=True)
    one = images[0]
    batch = transform(
        [one, one, *images], torch.tensor([5, 6, *range(10, 10 + len(images))]), epoch=2, seed=7
    )
    assert batch.shape == (len(images) + 2, 3, 96, 96) and batch.dtype == torch.float32
    low, high = _bounds(PRE)
    assert bool(torch.isfinite(batch).all()) and bool((batch >= low).all()) and bool((batch <= high).all())
    assert not torch.allclose(batch[0], batch[1])  # the same photo under two indices: two views
    # the view of a photo depends on (seed, epoch, index) only, not on the rest of the batch
    alone = transform([one], torch.tensor([6]), epoch=2, seed=7)
    assert torch.equal(alone[0], batch[1])
    assert not torch.allclose(transform([one], torch.tensor([6]), epoch=3, seed=7)[0], batch[1])
    assert not torch.allclose(transform([one], torch.tensor([6]), epoch=2, seed=8)[0], batch[1])


def test_the_seed_preset_without_motion_is_the_eval_transform_or_its_mirror(photos: dict[str, bytes]) -> None:
    images, _ = _decode(photos)
    still = {"name": "seed", "rotation": 0.0, "zoom": 0.0, "translate": 0.0}
    evaluated = BatchedTransform.from_config(PRE, None, train=False)(images)
    unflipped = BatchedTransform.from_config(PRE, {**still, "hflip": False}, train=True)
    assert torch.allclose(unflipped(images, torch.arange(len(images))), evaluated, atol=1e-5)
    flipping = BatchedTransform.from_config(PRE, still, train=True)
    views = flipping([images[0]] * 32, torch.arange(32), epoch=0, seed=0)
    mirrored = [bool(torch.allclose(view, evaluated[0].flip(-1), atol=1e-5)) for view in views]
    assert all(
        m or torch.allclose(view, evaluated[0], atol=1e-5) for m, view in zip(mirrored, views, strict=True)
    )
    assert 4 <= sum(mirrored) <= 28  # about half


def test_affine_batch_is_torchvisions_flip_and_affine() -> None:
    """One grid_sample for the batch does what torchvision's hflip + affine do to each image (non-square
    too), and what the PIL path's RandomAffine does to the 8-bit photo but for edge pixels."""
    images = torch.stack([TF.pil_to_tensor(_photo(80, 56, seed)) for seed in range(4)]).float() / 255
    angles, shifts = (
        torch.tensor([20.0, -35.0, 0.0, 10.0]),
        torch.tensor([[5.0, -3.0], [0.0, 7.0], [-9.0, 0.0], [2, 2]]),
    )
    scales, flips = torch.tensor([1.1, 0.8, 1.0, 0.9]), torch.tensor([False, True, False, True])
    result = affine_batch(images, angles, shifts, scales, flips)
    for image, angle, shift, scale, flip, out in zip(
        images, angles, shifts, scales, flips, result, strict=True
    ):
        options = {"angle": float(angle), "scale": float(scale), "shear": [0.0, 0.0]}
        image = TF.hflip(image) if flip else image
        expected = TF.affine(
            image, translate=[float(v) for v in shift], interpolation=InterpolationMode.BILINEAR, **options
        )
        assert float((out - expected).abs().max()) < 1e-4
        photo = TF.to_pil_image((image * 255).round().to(torch.uint8))
        moved = TF.affine(
            photo, translate=[int(v) for v in shift], interpolation=InterpolationMode.BILINEAR, **options
        )
        assert float((out - TF.pil_to_tensor(moved) / 255).abs().mean()) < 0.01


def test_jitter_batch_is_torchvisions_brightness_and_saturation() -> None:
    images = torch.stack([TF.pil_to_tensor(_photo(40, 30, seed)) for seed in range(4)]).float() / 255
    brightness, saturation = torch.tensor([0.8, 1.2, 1.0, 1.15]), torch.tensor([1.2, 0.8, 1.1, 1.2])
    first = torch.tensor([True, False, True, False])
    result = jitter_batch(images.clone(), brightness, saturation, first)
    for image, b, s, f, out in zip(images, brightness, saturation, first, result, strict=True):
        if f:
            expected = TF.adjust_saturation(TF.adjust_brightness(image, float(b)), float(s))
        else:
            expected = TF.adjust_brightness(TF.adjust_saturation(image, float(s)), float(b))
        assert float((out - expected).abs().max()) < 1e-5
    assert not torch.allclose(
        result[1], jitter_batch(images[1:2].clone(), brightness[1:2], saturation[1:2], first[:1])[0]
    )


def test_crop_boxes_follow_random_resized_crop() -> None:
    """Boxes lie inside the image, with RandomResizedCrop's area and aspect, and its mean area fraction."""
    count, height, width = 2000, 120, 160
    draws = torch.rand(count, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    boxes = crop_boxes([(height, width)] * count, draws, (0.35, 1.0))
    fractions = []
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fractions.append(h * w / (height * width))
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    crop = v2.RandomResizedCrop(8, scale=(0.35, 1.0))
    reference = []
    for _ in range(count):
        params = crop.make_params([image])
        reference.append(params["height"] * params["width"] / (height * width))
    assert abs(np.mean(fractions) - np.mean(reference)) < 0.02
    assert min(fractions) >= 0.33


def test_sample_generator_is_a_pure_function_of_seed_epoch_and_index() -> None:
    def draw(*key: int) -> torch.Tensor:
        return torch.rand(4, generator=sample_generator(*key))

    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    keys = [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3), (0, 0, 0), (-1, 0, 0), (3, 2, 1)]
    assert len({tuple(draw(*key).tolist()) for key in keys}) == len(keys)


def test_supports_names_the_presets_done_as_tensor_ops() -> None:
    assert all(BatchedTransform.supports({"name": name}) for name in ("none", "crop", "seed", "light"))
    assert BatchedTransform.supports(None)
    assert not BatchedTransform.supports({"name": "randaugment"})
    with pytest.raises(ValueError, match="randaugment"):
        BatchedTransform.from_config(PRE, {"name": "randaugment"}, train=True)
    # eval needs no augmentation, whatever the train preset
    assert not BatchedTransform.from_config(PRE, {"name": "randaugment"}, train=False).random
    with pytest.raises(ValueError, match="indices"):
        BatchedTransform.from_config(PRE, {"name": "crop"}, train=True)(
            [torch.zeros(3, 10, 10, dtype=torch.uint8)]
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_decode_and_transform_on_cuda(photos: dict[str, bytes], odd_files: dict[str, bytes]) -> None:
    files = {**photos, **odd_files}
    on_cpu, _ = _decode(files)
    on_gpu, kept = _decode(files, device="cuda")
    assert kept == list(range(len(files)))
    for name, cpu, gpu in zip(files, on_cpu, on_gpu, strict=True):
        assert gpu.device.type == "cuda" and gpu.dtype == torch.uint8 and gpu.shape == cpu.shape, name
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by about a level
        assert float((gpu.cpu().float() - cpu.float()).abs().mean()) < 2.5, name
    good = list(photos.values())[0]
    truncated = [_payload(good), _payload(good[: len(good) // 2])]
    with pytest.raises(BadImageError, match="truncated.jpg"):
        decode_batch(truncated, ["a.jpg", "truncated.jpg"], device="cuda")
    # the same transform on CUDA tensors: the same views (draws are made on the CPU), resampled alike
    moved = [image.cuda() for image in on_cpu]
    indices = torch.arange(len(on_cpu))
    for augment in ({"name": "none"}, {"name": "crop"}, {"name": "seed"}, {"name": "light"}):
        transform = BatchedTransform.from_config(PRE, augment, train=True)
        expected = transform(on_cpu, indices, epoch=0, seed=1)
        result = transform(moved, indices, epoch=0, seed=1)
        assert result.device.type == "cuda" and result.dtype == torch.float32
        difference = (result.cpu() - expected).abs()
        assert float(difference.mean()) < MEAN_TOLERANCE * 5, augment
