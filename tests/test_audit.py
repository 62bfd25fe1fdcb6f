"""audit.py (duplicates, likely label errors, stats) and what training does with duplicates and audits."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from foodvision.audit.tool import run_audit
from foodvision.data.datamodule import FoodDataModule
from foodvision.data.sources import DataLayoutError
from foodvision.training.fit import train

from .conftest import SHARED_MINI, compose_tool, make_class_tree

# Real photos for the duplicate tests (generated images look alike to a pretrained backbone); the first
# photos of these classes hold no duplicates among themselves (checked by test_clean_set_flags_no_duplicates).
REAL_CLASSES = ("baklava", "beignets", "bibimbap")
needs_mini = pytest.mark.skipif(not (SHARED_MINI / "images").is_dir(), reason="food101-mini not available")


def real_tree(root: Path, per_split: dict[str, int]) -> dict[str, dict[str, list[Path]]]:
    """``root/<split>/<class>/*.jpg`` of distinct food101-mini photos (copied): split -> class -> files."""
    tree: dict[str, dict[str, list[Path]]] = {}
    for c in REAL_CLASSES:
        photos = sorted((SHARED_MINI / "images" / c).glob("*.jpg"))
        start = 0
        for split, count in per_split.items():
            for photo in photos[start : start + count]:
                target = root / split / c / photo.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(photo, target)
                tree.setdefault(split, {}).setdefault(c, []).append(target)
            start += count
    return tree


def audit(tmp_path: Path, root: Path, *overrides: str) -> dict:
    cfg = compose_tool(
        "audit",
        "data=imagefolder",
        f"data.root={root}",
        f"output_dir={tmp_path / 'audit'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "progress=false",
        "num_workers=0",
        *overrides,
    )
    result = run_audit(cfg)
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["summary"] == result["summary"]
    assert (tmp_path / "audit" / "audit.html").is_file()
    return saved


def group_paths(audit_json: dict, kind: str) -> list[set[str]]:
    return [{f["path"] for f in g["files"]} for g in audit_json["duplicates"][kind]]


@needs_mini
def test_exact_duplicates_across_splits_and_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "photos"
    tree = real_tree(root, {"train": 6, "validation": 2, "test": 2})
    leaked = root / "test" / "baklava" / "copy_of_train.jpg"
    shutil.copy(tree["train"]["baklava"][0], leaked)
    relabelled = root / "train" / "beignets" / "also_baklava.jpg"
    shutil.copy(tree["train"]["baklava"][1], relabelled)

    result = audit(tmp_path, root, "features.enabled=false")

    exact = {
        frozenset(p): g
        for p, g in zip(group_paths(result, "exact"), result["duplicates"]["exact"], strict=True)
    }
    across_splits = exact[frozenset({str(tree["train"]["baklava"][0]), str(leaked)})]
    assert across_splits["cross_split"] and not across_splits["cross_class"]
    assert {f["split"] for f in across_splits["files"]} == {"train", "test"}
    across_classes = exact[frozenset({str(tree["train"]["baklava"][1]), str(relabelled)})]
    assert across_classes["cross_class"] and not across_classes["cross_split"]
    assert {f["class"] for f in across_classes["files"]} == {"baklava", "beignets"}
    assert len(exact) == 2
    assert result["summary"]["exact_duplicates"] == {
        "groups": 2,
        "files": 4,
        "cross_split": 1,
        "cross_class": 1,
    }
    printed = capsys.readouterr().out
    assert "exact duplicates:    2 groups (4 files), 1 across splits, 1 across classes" in printed
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert page.count('data-kind="exact"') == 2 and "across classes" in page


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHARED_MINI / "images").is_dir():
        pytest.skip("food101-mini not available")
    root = tmp_path_factory.mktemp("clean") / "photos"
    real_tree(root, {"train": 8, "validation": 2, "test": 2})
    return root


def test_clean_set_flags_no_duplicates(tmp_path: Path, clean_tree: Path) -> None:
    result = audit(tmp_path, clean_tree, "features.image_size=160", "label_issues.enabled=false")
    assert result["summary"]["exact_duplicates"]["groups"] == 0
    assert result["summary"]["near_duplicates"]["groups"] == 0
    assert result["stats"]["images"] == 36 and result["stats"]["unreadable"]["count"] == 0
    assert result["stats"]["formats"] == {"JPEG": 36}


def test_resized_reencoded_and_cropped_copies_are_near_duplicates(tmp_path: Path, clean_tree: Path) -> None:
    root = tmp_path / "photos"
    shutil.copytree(clean_tree, root)
    original = sorted((root / "train" / "bibimbap").glob("*.jpg"))[0]
    photo = Image.open(original).convert("RGB")
    # A smaller, re-encoded copy in the test split, and a 90 % centre crop (PNG) in another class.
    resized = root / "test" / "bibimbap" / "smaller.jpg"
    photo.resize((photo.width * 3 // 5, photo.height * 3 // 5)).save(resized, quality=60)
    w, h = photo.size
    cropped = root / "validation" / "baklava" / "cropped.png"
    photo.crop((w // 20, h // 20, w - w // 20, h - h // 20)).save(cropped)

    result = audit(tmp_path, root, "features.image_size=160", "label_issues.enabled=false")

    assert result["summary"]["exact_duplicates"]["groups"] == 0
    groups = group_paths(result, "near")
    assert {str(original), str(resized), str(cropped)} in groups
    group = result["duplicates"]["near"][groups.index({str(original), str(resized), str(cropped)})]
    assert group["cross_split"] and group["cross_class"]
    evidence = {(p["a"], p["b"]): p for p in group["pairs"]}
    resized_pair = evidence.get((str(original), str(resized))) or evidence[(str(resized), str(original))]
    assert resized_pair["phash_distance"] <= 4
    assert len(groups) == 1  # nothing else in the clean set became a near duplicate
    assert result["stats"]["formats"] == {"JPEG": 37, "PNG": 1}


def test_moved_photos_rank_among_the_top_label_issues(tmp_path: Path) -> None:
    """5 % of one class's photos moved into another class: cleanlab ranks most of them at the top."""
    root = tmp_path / "flat"
    files = make_class_tree(root, ["a", "b", "c", "d"], 40)
    moved = []
    for photo in files["a"][:2]:
        target = root / "b" / f"moved_{photo.name}"
        photo.rename(target)
        moved.append(str(target))

    result = audit(tmp_path, root, "features.image_size=32", "features.engine=torch", "label_issues.folds=3")

    issues = result["label_issues"]["issues"]
    top = [issue["path"] for issue in issues[: 2 * len(moved)]]
    assert all(path in top for path in moved)
    for issue in issues:
        if issue["path"] in moved:
            assert issue["given"] == "b" and issue["suggested"] == "a"
    assert result["label_issues"]["flagged"] == len(issues) >= 2
    assert "rank" in (tmp_path / "audit" / "audit.html").read_text()


def test_auto_split_keeps_every_duplicate_group_in_one_split(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    files = make_class_tree(root, ["a", "b", "c"], 30)
    groups = []
    for photos in files.values():
        for k, photo in enumerate(photos[:8]):
            copies = [photo]
            for n in range(1 + k % 3):
                copy = photo.with_name(f"{photo.stem} ({n + 1}).jpg")
                shutil.copy(photo, copy)
                copies.append(copy)
            groups.append(copies)
    cross = root / "b" / "same_as_a0.jpg"  # the same photo under two classes
    shutil.copy(files["a"][0], cross)
    groups[0].append(cross)

    def split_of(module: FoodDataModule) -> dict[str, str]:
        data = module.discover()
        return {path: split for split, samples in data.splits.items() for path, _ in samples}

    module = FoodDataModule(source="imagefolder", root=str(root), seed=3, cache_dir=str(tmp_path / "cache"))
    where = split_of(module)
    for group in groups:
        assert len({where[str(p)] for p in group}) == 1, group
    assert set(where.values()) == {"train", "val", "test"}
    # Seeded: the same split again (digests from the cache), another seed another split.
    again = FoodDataModule(source="imagefolder", root=str(root), seed=3, cache_dir=str(tmp_path / "cache"))
    assert split_of(again) == where
    other = FoodDataModule(source="imagefolder", root=str(root), seed=4, cache_dir=str(tmp_path / "cache"))
    assert split_of(other) != where
    # Written to splits.csv as before.
    written = FoodDataModule(source="imagefolder", root=str(root), seed=3, output_dir=str(tmp_path / "run"))
    split_of(written)
    with (tmp_path / "run" / "splits.csv").open() as handle:
        assert {row["path"]: row["split"] for row in csv.DictReader(handle)} == where


def test_grouping_leaves_a_split_without_duplicates_unchanged(flat_folder: Path, tmp_path: Path) -> None:
    grouped = FoodDataModule(source="imagefolder", root=str(flat_folder), seed=1, cache_dir=str(tmp_path))
    plain = FoodDataModule(source="imagefolder", root=str(flat_folder), seed=1, group_duplicates=False)
    assert grouped.discover().splits == plain.discover().splits


def _user_split_with_a_leak(root: Path) -> tuple[Path, Path]:
    source = root / "train" / "apple_pie" / "apple_pie_000.jpg"
    leaked = root / "test" / "apple_pie" / "leaked.jpg"
    shutil.copy(source, leaked)
    return source, leaked


def test_cross_split_duplicates_error_or_drop(image_folder: Path, tmp_path: Path) -> None:
    source, leaked = _user_split_with_a_leak(image_folder)
    strict = FoodDataModule(source="imagefolder", root=str(image_folder), duplicates="error", num_workers=0)
    with pytest.raises(
        DataLayoutError, match=r"1 photo\(s\) appear in more than one split.*data.duplicates=drop"
    ):
        strict.verify_images(progress=False)

    run = tmp_path / "run"
    dropping = FoodDataModule(
        source="imagefolder", root=str(image_folder), duplicates="drop", num_workers=0, output_dir=str(run)
    )
    dropping.verify_images(progress=False)
    test_files = [path for path, _ in dropping.discover().splits["test"]]
    assert str(leaked) not in test_files and len(test_files) == 12
    assert str(source) in [path for path, _ in dropping.discover().splits["train"]]
    assert dropping.duplicate_check.dropped == [str(leaked)]
    report = json.loads((run / "duplicates.json").read_text())
    assert [{f["path"] for f in g["files"]} for g in report["exact"]] == [{str(source), str(leaked)}]


def test_training_warns_on_leaks_and_leaves_out_flagged_label_errors(
    compose_train, image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, leaked = _user_split_with_a_leak(image_folder)
    flagged = [image_folder / "train" / "baklava" / f"baklava_00{i}.jpg" for i in (1, 2)]
    audit_json = tmp_path / "audit.json"
    issues = [
        {
            "path": str(p),
            "split": "train",
            "given": "baklava",
            "suggested": "apple_pie",
            "score": 0.01,
            "flagged": True,
        }
        for p in flagged
    ]
    audit_json.write_text(json.dumps({"kind": "foodvision-audit", "label_issues": {"issues": issues}}))
    cfg = compose_train(
        "experiment=scratch_baseline",
        "debug=fdr",
        "test=false",
        f"data.exclude_label_issues={audit_json}",
        root=image_folder,
    )
    with caplog.at_level(logging.WARNING):
        _, metrics = train(cfg)
    run = tmp_path / "run"
    warning = next(r.getMessage() for r in caplog.records if "more than one split" in r.getMessage())
    assert "1 photo(s) appear in more than one split (2 files)" in warning
    assert str(run / "duplicates.json") in warning
    assert json.loads((run / "duplicates.json").read_text())["exact"][0]["files"][1]["path"] == str(leaked)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["cross_split_duplicate_groups"] == 1 and saved["dropped_duplicates"] == 0
    assert saved["excluded_label_issues"] == 2 == metrics["excluded_label_issues"]
    with (run / "excluded_label_issues.csv").open() as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == [str(p) for p in flagged]
    with (run / "splits.csv").open() as handle:  # splits.csv records the split itself, before exclusion
        assert sum(row["split"] == "train" for row in csv.DictReader(handle)) == 36


def test_exclude_label_issues_needs_an_audit_file(image_folder: Path, tmp_path: Path) -> None:
    module = FoodDataModule(
        source="imagefolder", root=str(image_folder), exclude_label_issues=str(tmp_path / "missing.json")
    )
    with pytest.raises(DataLayoutError, match="data.exclude_label_issues=.*missing.json: no such file"):
        module.discover()
    other = tmp_path / "other.json"
    other.write_text("{}")
    module = FoodDataModule(source="imagefolder", root=str(image_folder), exclude_label_issues=str(other))
    with pytest.raises(DataLayoutError, match="not an audit.json written by audit.py"):
        module.discover()
