"""Ingesting a folder of the user's own images, with files the tests make."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.data import ImageFolderSource
from cnnlab.data.imagefolder import load_rgb
from cnnlab.errors import ConfigError
from conftest import run_script, tiny_overrides

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def make_tree(root, per_class=10, size=(40, 30)):
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            extension = ["png", "jpg", "bmp", "webp"][i % 4]
            Image.new("RGB", size, colour).save(root / name / f"{i}.{extension}")
    return root


def test_fractions_split_every_class_alike_and_deterministically(tmp_path):
    root = make_tree(tmp_path / "images")
    cache = ImageFolderSource(root, tmp_path / "cache", stored_size=16, val_fraction=0.2, test_fraction=0.2).prepare()
    assert cache.classes == ["blue", "green", "red"]
    for split, expected in [("train", 6), ("val", 2), ("test", 2)]:
        part = cache.split(split)
        assert np.bincount(part.labels, minlength=3).tolist() == [expected] * 3
        assert part.images.shape[1:] == (16, 16, 3)
    red = cache.split("train").images[cache.split("train").labels == 2]
    assert np.abs(red.astype(int) - COLOURS["red"]).max() <= 3  # decoded colours survive (JPEG: nearly)
    manifest = cache.meta["files"]
    assert len(manifest) == 30 and {"file", "class", "split", "sha256"} <= set(manifest[0])
    again = ImageFolderSource(root, tmp_path / "cache2", stored_size=16, val_fraction=0.2, test_fraction=0.2).prepare()
    assert [f["split"] for f in again.meta["files"]] == [f["split"] for f in manifest]


def test_given_split_folders_are_kept(tmp_path):
    for split, count in [("train", 4), ("val", 2), ("test", 3)]:
        make_tree(tmp_path / "images" / split, per_class=count)
    cache = ImageFolderSource(tmp_path / "images", tmp_path / "cache", stored_size=8).prepare()
    assert [len(cache.split(s).labels) for s in ("train", "val", "test")] == [12, 6, 9]


def test_rerun_is_a_no_op_and_a_changed_file_gives_a_new_cache(tmp_path):
    root = make_tree(tmp_path / "images")
    source = ImageFolderSource(root, tmp_path / "cache", stored_size=8)
    first = source.prepare()
    assert source.prepare().dir == first.dir
    Image.new("RGB", (40, 30), (0, 0, 0)).save(root / "red" / "0.png")
    assert source.prepare().dir != first.dir


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "1"])
def test_any_image_mode_becomes_rgb(tmp_path, mode):
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image = Image.new(mode, (20, 20), 200 if mode in ("L", "P", "1") else None)
    if mode == "I;16":
        image = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    image.save(path)
    array = load_rgb(path, 8)
    assert array.shape == (8, 8, 3) and array.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    upright = load_rgb(tmp_path / "rotated.jpg", 20)
    assert upright[2, 10, 0] > 200 and upright[-3, 10, 2] > 200  # red on top, blue at the bottom


def test_large_images_are_downscaled_on_ingest(tmp_path):
    Image.new("RGB", (4000, 3000), (10, 120, 240)).save(tmp_path / "large.jpg", quality=90)
    array = load_rgb(tmp_path / "large.jpg", 32)
    assert array.shape == (32, 32, 3) and abs(int(array[16, 16, 2]) - 240) < 6


@pytest.mark.parametrize("arrange, message", [
    (lambda root: None, "image folder not found"),
    (lambda root: make_tree(root) and [p.unlink() for p in (root / "blue").iterdir()], "no images"),
    (lambda root: (root / "only").mkdir(parents=True) or Image.new("RGB", (4, 4)).save(root / "only" / "a.png"),
     "at least two class folders"),
    (lambda root: make_tree(root) and [p.rename(p.with_suffix(".txt")) for p in (root / "red").iterdir()],
     "no images"),
])
def test_unusable_folders_are_refused_naming_the_path(tmp_path, arrange, message):
    root = tmp_path / "images"
    arrange(root)
    with pytest.raises(ConfigError, match=message) as error:
        ImageFolderSource(root, tmp_path / "cache").prepare()
    assert str(root) in str(error.value)
    assert not (tmp_path / "cache").exists()


def make_bad_files(root):
    (root / "red" / "empty.png").write_bytes(b"")
    (root / "green" / "text.jpg").write_text("not an image")
    good = (root / "blue" / "0.png").read_bytes()
    (root / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_images_are_all_named_in_one_report(tmp_path):
    root = make_tree(tmp_path / "images")
    make_bad_files(root)
    with pytest.raises(ConfigError) as error:
        ImageFolderSource(root, tmp_path / "cache").prepare()
    message = str(error.value)
    assert "3 unreadable image(s)" in message
    for name in ["red/empty.png", "green/text.jpg", "blue/truncated.png"]:
        assert name in message
    assert "skip_bad_images=true" in message


def test_bad_images_can_be_skipped_and_are_listed(tmp_path):
    root = make_tree(tmp_path / "images")
    make_bad_files(root)
    cache = ImageFolderSource(root, tmp_path / "cache", skip_bad_images=True).prepare()
    assert sorted(b["file"] for b in cache.meta["skipped"]) == ["blue/truncated.png", "green/text.jpg", "red/empty.png"]
    assert len(cache.meta["files"]) == 30
    assert json.loads((cache.dir / "meta.json").read_text())["skipped"]


@pytest.mark.slow
def test_train_on_a_folder_of_pngs_and_jpegs_listing_skipped_files_in_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    root = make_tree(tmp_path / "images", per_class=12)
    make_bad_files(root)
    result = run_script("train.py", "data=imagefolder", f"data.source.root={root}", "data.source.skip_bad_images=true",
                        "data.image_size=32", *[o for o in tiny_overrides(tmp_path) if not o.startswith("data.source")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test accuracy" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("cnnlab").experiment_id])
    assert run.data.params["data.skipped_images"] == "3"
    assert run.data.params["data.cache"].startswith("imagefolder-")
    [used] = run.inputs.dataset_inputs
    assert f"{used.dataset.name}-{used.dataset.digest}" == run.data.params["data.cache"]
    assert sum(json.loads(used.dataset.profile).values()) == 3 * 12  # the good images; the 3 bad files left out
    listed = json.loads(Path(client.download_artifacts(run.info.run_id, "data/skipped_images.json", str(tmp_path))).read_text())
    assert sorted(item["file"] for item in listed) == ["blue/truncated.png", "green/text.jpg", "red/empty.png"]


def test_missing_root_is_a_one_line_error(tmp_path):
    result = run_script("train.py", "data=imagefolder", f"paths.root_dir={tmp_path}", "logger=none")
    assert result.returncode == 2
    assert "data.source.root" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
