"""Very large photos are decoded at reduced size (issue #20): JPEG draft mode, ``Image.reduce`` for the rest,
in every place a photo is decoded; the result is what a full decode gives, within resampling tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foodvision.data.datasets import ImageListDataset
from foodvision.data.images import load_rgb
from foodvision.data.transforms import Preprocessing
from foodvision.inference.batches import ImageFiles


@pytest.fixture(scope="module")
def big_photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 4000x3000 photo-like image (smooth, with edges) as JPEG and PNG, and a JPEG rotated by EXIF."""
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).resize(
        (4000, 3000), Image.BICUBIC
    )
    paths = {"jpeg": folder / "big.jpg", "png": folder / "big.png", "rotated": folder / "rotated.jpg"}
    image.save(paths["jpeg"], quality=92)
    image.save(paths["png"], compress_level=1)
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 3000x4000
    image.save(paths["rotated"], quality=92, exif=exif.tobytes())
    return paths


@pytest.mark.parametrize("kind", ["jpeg", "png", "rotated"])
def test_large_photos_are_decoded_reduced_and_match_the_full_decode(
    big_photos: dict[str, Path], kind: str
) -> None:
    pre = Preprocessing(image_size=256)
    size = pre.resize_size
    full = load_rgb(big_photos[kind])
    reduced = load_rgb(big_photos[kind], draft_size=(size, size))
    assert full.size == ((3000, 4000) if kind == "rotated" else (4000, 3000))
    # decoded at a fraction of the pixels, never below the working size, same orientation
    assert min(reduced.size) >= size and reduced.width * reduced.height * 16 <= full.width * full.height
    assert (reduced.width > reduced.height) == (full.width > full.height)
    transform = pre.eval_transform()
    difference = (transform(reduced) - transform(full)).abs()
    assert float(difference.mean()) < 0.02 and float(difference.max()) < 0.5  # normalised units (std ~ 1)


def test_every_decode_path_uses_the_reduced_decode(
    big_photos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training and extraction (ImageListDataset), eval and predict (ImageFiles) and the demo and exported
    app (app_template) all decode the PNG reduced: Image.reduce is called, by the working size's factor."""
    from foodvision.app import template as app_template

    factors: list[int] = []
    real = Image.Image.reduce

    def spy(self: Image.Image, factor: int, box: object = None) -> Image.Image:
        factors.append(factor)
        return real(self, factor) if box is None else real(self, factor, box)

    monkeypatch.setattr(Image.Image, "reduce", spy)
    pre = Preprocessing(image_size=256)
    photo = str(big_photos["png"])
    ImageListDataset([(photo, 0)], pre.eval_transform(), draft_size=pre.resize_size)[0]
    ImageFiles([photo], pre)[0]
    array = app_template.preprocess(app_template.load_rgb(photo, pre.to_dict()), pre.to_dict())
    assert factors == [3000 // pre.resize_size] * 3
    assert array.shape == (3, 256, 256) and isinstance(torch.from_numpy(array), torch.Tensor)
