"""The image-folder source on real photographs, in the layouts downloaded datasets ship in.

The photos are the ones scikit-learn and matplotlib install (china.jpg, flower.jpg, grace_hopper.jpg):
each class is crops of one photo, plus the untouched photo itself under an upper-case name. A cached
image's label is checked against the photo it came from, decoded here independently of the project.
"""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.data import ImageFolderSource
from cnnlab.errors import ConfigError
from conftest import photographs, run_script

SIZE = 32  # stored_size: small, so the tests stay fast
CROPS_PER_CLASS = 30


@pytest.fixture(scope="module")
def crops(tmp_path_factory) -> dict[str, list[Path]]:
    """{class: files}: random crops of the class's photo in mixed formats and case, then the photo untouched."""
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    extensions = [".jpg", ".png", ".JPG", ".PNG", ".jpeg", ".JPEG"]
    files = {}
    for name, photo in photographs().items():
        image = Image.open(photo).convert("RGB")
        files[name] = []
        for i in range(CROPS_PER_CLASS):
            side = int(rng.integers(120, min(image.size)))
            x, y = int(rng.integers(0, image.width - side)), int(rng.integers(0, image.height - side))
            path = folder / f"{name}_{i}{extensions[i % len(extensions)]}"
            image.crop((x, y, x + side, y + side)).resize((40, 40), Image.Resampling.BILINEAR).save(path)
            files[name].append(path)
        original = folder / f"{name}_original.JPG"  # as a camera names it
        shutil.copyfile(photo, original)
        files[name].append(original)
    return files


def build(root: Path, crops: dict[str, list[Path]], per_class: dict[str, int], classes=None) -> Path:
    """Copy distinct images into root/<folder>/<class>/ ("" for class folders directly under root)."""
    start = 0
    for folder, count in per_class.items():
        for name in classes or crops:
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            for path in crops[name][start:start + count]:
                shutil.copyfile(path, root / folder / name / path.name)
        start += count
    return root


def reference(path: Path) -> np.ndarray:
    """The photo decoded without the project's code: a centre square, box-averaged to SIZE x SIZE."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    height, width = pixels.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(pixels[top:top + side, left:left + side])
    return np.asarray(square.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.int16)


def assert_labels_match_photos(cache, crops) -> None:
    """Every cached image is nearest to an image of the photo its label names, and close to it."""
    names = [name for name, files in crops.items() for _ in files]
    references = np.stack([reference(path) for files in crops.values() for path in files])
    for split in ("train", "val", "test"):
        part = cache.split(split)
        distance = np.abs(np.asarray(part.images, np.int16)[:, None] - references[None]).mean(axis=(2, 3, 4))
        nearest = distance.argmin(axis=1)
        assert distance.min(axis=1).max() < 20, "a cached image matches no photo"
        assert [names[i] for i in nearest] == [cache.classes[label] for label in part.labels], split


def counts(cache, split: str) -> list[int]:
    return np.bincount(cache.split(split).labels, minlength=len(cache.classes)).tolist()


def layout_lines(caplog) -> list[str]:
    messages = [r.getMessage() for r in caplog.records if r.name == "cnnlab.data.imagefolder"]
    return [message for message in messages if ": layout " in message]


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="cnnlab.data.imagefolder")


def test_kaggle_train_and_test_folders_are_splits_and_val_is_carved_from_train_per_class(tmp_path, crops, caplog):
    root = build(tmp_path / "images", crops, {"train": 20, "test": 6})
    source = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, val_fraction=0.25, seed=3)
    cache = source.prepare()
    assert cache.classes == ["china", "flower", "hopper"]  # never "test" and "train"
    assert [counts(cache, s) for s in ("train", "val", "test")] == [[15] * 3, [5] * 3, [6] * 3]
    assert_labels_match_photos(cache, crops)
    splits = {f["file"]: f["split"] for f in cache.meta["files"]}
    assert {split for file, split in splits.items() if file.startswith("test/")} == {"test"}
    assert {split for file, split in splits.items() if file.startswith("train/")} == {"train", "val"}
    assert layout_lines(caplog) == [f"imagefolder {root}: layout train/+test/ (val 25% carved from train/, per class): "
                                    "train 45, val 15, test 18 images, 3 classes"]
    again = ImageFolderSource(root, tmp_path / "cache2", stored_size=SIZE, val_fraction=0.25, seed=3).prepare()
    assert [f["split"] for f in again.meta["files"]] == [f["split"] for f in cache.meta["files"]]


def test_what_a_zip_from_a_mac_leaves_beside_the_splits_is_not_data(tmp_path, crops):
    root = build(tmp_path / "images", crops, {"train": 4, "test": 2})
    (root / "__MACOSX" / "train").mkdir(parents=True)  # resource forks: ._<name> files, not images
    (root / "__MACOSX" / "train" / "._x.jpg").write_bytes(b"\x00\x05\x16\x07")
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, val_fraction=0.25).prepare()
    assert cache.classes == ["china", "flower", "hopper"]
    assert not any("__MACOSX" in f["file"] for f in cache.meta["files"])


def test_train_and_val_folders_keep_val_and_carve_test_from_train(tmp_path, crops, caplog):
    root = build(tmp_path / "images", crops, {"train": 20, "val": 4})
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, test_fraction=0.2).prepare()
    assert cache.classes == ["china", "flower", "hopper"]
    assert [counts(cache, s) for s in ("train", "val", "test")] == [[16] * 3, [4] * 3, [4] * 3]
    assert_labels_match_photos(cache, crops)
    given_val = {f["file"] for f in cache.meta["files"] if f["split"] == "val"}
    assert given_val == {str(p.relative_to(root)) for p in (root / "val").rglob("*.*")}
    assert "layout train/+val/ (test 20% carved from train/, per class)" in layout_lines(caplog)[0]


def test_three_split_folders_in_any_usual_spelling_are_kept(tmp_path, crops, caplog):
    root = build(tmp_path / "images", crops, {"Train": 10, "valid": 4, "TEST": 5})
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE).prepare()
    assert cache.classes == ["china", "flower", "hopper"]
    assert [counts(cache, s) for s in ("train", "val", "test")] == [[10] * 3, [4] * 3, [5] * 3]
    assert_labels_match_photos(cache, crops)
    assert "layout Train/+valid/+TEST/ (as given): train 30, val 12, test 15 images" in layout_lines(caplog)[0]


def test_a_train_folder_alone_gives_val_and_test_carved_from_it(tmp_path, crops, caplog):
    root = build(tmp_path / "images", crops, {"train": 20})
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, val_fraction=0.1, test_fraction=0.2).prepare()
    assert cache.classes == ["china", "flower", "hopper"]
    assert [counts(cache, s) for s in ("train", "val", "test")] == [[14] * 3, [2] * 3, [4] * 3]
    assert "layout train/ (val 10% and test 20% carved from train/, per class)" in layout_lines(caplog)[0]


def test_nested_class_folders_and_upper_case_extensions_belong_to_their_class(tmp_path, crops, caplog):
    root = tmp_path / "images"
    for name, files in crops.items():  # <class>/, <class>/2019/, <class>/2019/raw/
        for i, path in enumerate(files):
            folder = root / name / ["", "2019", "2019/raw"][i % 3]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, folder / path.name)
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, val_fraction=0.2, test_fraction=0.2).prepare()
    assert cache.classes == ["china", "flower", "hopper"]
    per_class = CROPS_PER_CLASS + 1
    assert [sum(counts(cache, s)) for s in ("train", "val", "test")] == [3 * (per_class - 12), 3 * 6, 3 * 6]
    files = {f["file"]: f["class"] for f in cache.meta["files"]}
    assert files["hopper/hopper_original.JPG"] == "hopper"
    assert files["flower/2019/raw/flower_5.JPEG"] == "flower"
    assert sum(name.endswith((".JPG", ".PNG", ".JPEG")) for name in files) == 3 * 16
    assert_labels_match_photos(cache, crops)
    assert "layout class folders (val 20% and test 20% carved from each class)" in layout_lines(caplog)[0]


def class_named_train(root: Path, crops) -> None:
    """Three classes, one of them (photos of a train, say) literally called "train"."""
    build(root, crops, {"": 3}, ["china", "flower"])
    (root / "train").mkdir()
    for path in crops["hopper"][:3]:
        shutil.copyfile(path, root / "train" / path.name)


@pytest.mark.parametrize("arrange, named", [
    (lambda root, crops: build(root, crops, {"train": 3, "test": 2}) and build(root, crops, {"": 2}, ["china"]),
     ["mixes split folders", "train/, test/", "china/"]),
    (class_named_train, ["mixes split folders", "(train/)", "china/, flower/", "rename a class folder"]),
    (lambda root, crops: build(root, crops, {"train": 3}) and build(root, crops, {"test": 2}, ["china", "flower"]),
     ["hold different classes", "test/ lacks hopper"]),
    (lambda root, crops: build(root, crops, {"train": 3, "val": 2, "valid": 2}), ["two val folders", "val/", "valid/"]),
    (lambda root, crops: build(root, crops, {"val": 3, "test": 2}), ["no train/"]),
])
def test_ambiguous_layouts_are_refused_in_one_line_naming_the_folders(tmp_path, crops, arrange, named):
    root = tmp_path / "images"
    arrange(root, crops)
    with pytest.raises(ConfigError) as error:
        ImageFolderSource(root, tmp_path / "cache").prepare()
    message = str(error.value)
    assert str(root) in message and "\n" not in message
    for text in named:
        assert text in message
    assert not (tmp_path / "cache").exists()


def add_unreadable_files(folder: Path, count: int) -> list[str]:
    for i in range(count):
        (folder / f"broken_{i}.jpg").write_bytes(b"" if i % 2 else b"\xff\xd8 not a jpeg")
    return [f"broken_{i}.jpg" for i in range(count)]


def test_skipped_images_are_counted_and_named_in_the_log(tmp_path, crops, caplog):
    root = build(tmp_path / "images", crops, {"train": 6, "test": 3})
    add_unreadable_files(root / "train" / "china", 7)
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE, skip_bad_images=True).prepare()
    assert len(cache.meta["skipped"]) == 7
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert f"imagefolder {root}: skipped 7 unreadable image(s)" in message
    named = [f"train/china/broken_{i}.jpg" for i in range(5)]
    assert ", ".join(named) + " and 2 more" in message
    assert str(cache.dir / "meta.json") in message


def test_the_layout_is_part_of_the_cache_and_an_unchanged_folder_is_not_read_again(tmp_path, crops, caplog,
                                                                                     monkeypatch):
    root = build(tmp_path / "images", crops, {"train": 6, "test": 3})
    first = ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE).prepare()
    assert first.meta["source"]["layout"] == "train/+test/"

    def no_decoding(*args):
        raise AssertionError("an unchanged folder was decoded again")

    monkeypatch.setattr("cnnlab.data.imagefolder.load_rgb", no_decoding)
    assert ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE).prepare().dir == first.dir
    assert len(layout_lines(caplog)) == 2  # each run says what it uses, cached or not
    monkeypatch.undo()
    (root / "test").rename(root / "val")  # the same files now say "validation": a new cache
    assert ImageFolderSource(root, tmp_path / "cache", stored_size=SIZE).prepare().dir != first.dir


@pytest.mark.slow
def test_prepare_prints_the_layout_and_skipped_files_on_the_console_and_in_the_run_log(tmp_path, crops):
    root = build(tmp_path / "images", crops, {"train": 10, "test": 4})
    add_unreadable_files(root / "test" / "flower", 2)
    result = run_script("prepare.py", "data=imagefolder", f"data.source.root={root}", f"paths.root_dir={tmp_path}",
                        f"data.source.stored_size={SIZE}", "data.source.skip_bad_images=true")
    assert result.returncode == 0, result.stderr[-3000:]
    layout = (f"imagefolder {root}: layout train/+test/ (val 10% carved from train/, per class): "
              "train 27, val 3, test 12 images, 3 classes")
    skipped = f"imagefolder {root}: skipped 2 unreadable image(s)"
    assert layout in result.stdout and skipped in result.stdout
    assert "3 classes (china, flower, hopper)" in result.stdout
    (run_log,) = (tmp_path / "outputs").rglob("prepare.log")
    assert layout in run_log.read_text() and skipped in run_log.read_text()


@pytest.mark.slow
def test_a_mixed_root_stops_prepare_with_one_line_and_exit_code_2(tmp_path, crops):
    root = build(tmp_path / "images", crops, {"train": 3, "test": 2})
    build(root, crops, {"": 2}, ["china"])
    result = run_script("prepare.py", "data=imagefolder", f"data.source.root={root}", f"paths.root_dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert f"Error: {root} mixes split folders (train/, test/) with other folders (china/)" in line
