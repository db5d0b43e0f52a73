"""Test-time views: crop geometry, averaging per image, and the files an evaluation writes."""

import csv

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.data.augment import eval_transform, tta_views
from cnnlab.data.cache import CachedSplit
from cnnlab.errors import ConfigError
from cnnlab.evaluation.evaluate import view_groups
from cnnlab.evaluation.reports import scores, write_reports
from cnnlab.evaluation.tta import average_probabilities, predict, view_loader


def coordinate_image(size: int) -> np.ndarray:
    """Each pixel holds its own row (red) and column (green), so a view shows where it was cut from."""
    rows, cols = np.mgrid[0:size, 0:size]
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


def apply(views, image):
    return [view(image=image)["image"] for view in views]


def test_five_crop_is_the_centre_and_the_four_corners_of_the_resized_image():
    image = coordinate_image(40)  # resize_ratio 1.25 at 32 px resizes to 40: no resampling, exact pixels
    centre, top_left, top_right, bottom_left, bottom_right = apply(tta_views(32, crops=5, resize_ratio=1.25), image)
    np.testing.assert_array_equal(centre, image[4:36, 4:36])
    np.testing.assert_array_equal(top_left, image[:32, :32])
    np.testing.assert_array_equal(top_right, image[:32, 8:])
    np.testing.assert_array_equal(bottom_left, image[8:, :32])
    np.testing.assert_array_equal(bottom_right, image[8:, 8:])


def test_ten_crop_adds_the_exact_mirror_of_each_crop():
    image = coordinate_image(40)
    views = apply(tta_views(32, crops=5, flip=True, resize_ratio=1.25), image)
    assert len(views) == 10
    five = apply(tta_views(32, crops=5, resize_ratio=1.25), image)
    for crop, view, mirror in zip(five, views[:5], views[5:]):
        np.testing.assert_array_equal(view, crop)
        np.testing.assert_array_equal(mirror, crop[:, ::-1])


def test_crops_are_cut_from_a_larger_resize_of_the_image():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    resized = cv2.resize(image, (37, 37), interpolation=cv2.INTER_AREA)  # round(32 * 256/224), as training resizes
    centre, top_left, _, _, bottom_right = apply(tta_views(32, crops=5, resize_ratio=256 / 224), image)
    np.testing.assert_array_equal(top_left, resized[:32, :32])
    np.testing.assert_array_equal(bottom_right, resized[5:, 5:])
    np.testing.assert_array_equal(centre, resized[2:34, 2:34])


def test_flip_is_the_image_and_its_mirror():
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    plain, mirror = apply(tta_views(32, flip=True), image)
    np.testing.assert_array_equal(plain, image)
    np.testing.assert_array_equal(mirror, image[:, ::-1])


@pytest.mark.parametrize("stored", [32, 48])
def test_the_plain_view_is_what_training_tests_on(stored):
    image = np.random.default_rng(stored).integers(0, 256, (stored, stored, 3), dtype=np.uint8)
    (view,) = apply(tta_views(32), image)
    np.testing.assert_array_equal(view, eval_transform(32)(image=image)["image"])


@pytest.mark.parametrize("option, overrides, count", [
    ("none", [], 1), ("flip", [], 2), ("five_crop", [], 5), ("ten_crop", [], 10),
    ("ten_crop", ["tta.scales=[1.0,1.15]"], 20), ("five_crop", ["tta.scales=[1.0,1.15,1.3]"], 15),
])
def test_each_option_gives_its_number_of_views(compose, option, overrides, count):
    cfg = compose(f"tta={option}", *overrides, config_name="evaluate")  # test-time views are evaluate.py's
    views = apply(tta_views(32, **cfg.tta), coordinate_image(32))
    assert len(views) == count
    assert all(view.shape == (32, 32, 3) for view in views)


def test_each_scale_crops_its_own_resize():
    image = coordinate_image(40)  # at ratio 1.0: scale 1.25 resizes to 40 px, exactly the image
    views = apply(tta_views(32, crops=5, scales=[1.0, 1.25]), image)
    np.testing.assert_array_equal(views[5], image[4:36, 4:36])  # the second scale's centre
    np.testing.assert_array_equal(views[9], image[8:, 8:])


@pytest.mark.parametrize("settings, message", [
    ({"crops": 3}, "tta.crops=3"),
    ({"crops": 5, "resize_ratio": 1.0, "scales": [0.9]}, "smaller than the 32 px crops"),
])
def test_impossible_views_are_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        tta_views(32, **settings)


def test_tta_none_is_the_plain_view_only():
    plain = {"crops": 1, "flip": False, "resize_ratio": 1.0, "scales": [1.0]}
    views, groups = view_groups("none", plain, 32)
    assert len(views) == 1 and groups == {"none": slice(0, 1)}
    with pytest.raises(ConfigError, match="tta=none is the plain view alone"):
        view_groups("none", {**plain, "flip": True}, 32)
    views, groups = view_groups("ten_crop", {**plain, "crops": 5, "flip": True, "resize_ratio": 1.25}, 32)
    assert len(views) == 11 and groups == {"none": slice(0, 1), "ten_crop": slice(1, 11)}


def test_probabilities_not_logits_are_averaged_per_image():
    sure, unsure = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.7])
    logits = torch.stack([torch.stack([sure.log(), unsure.log()]),          # image 0: two views
                          torch.stack([sure.log() + 5, sure.log() - 3])])   # image 1: same probabilities
    averaged = average_probabilities(logits)
    torch.testing.assert_close(averaged, torch.stack([(sure + unsure) / 2, sure]))
    torch.testing.assert_close(averaged.sum(dim=1), torch.ones(2))


class ChannelMeans(nn.Module):
    """A stand-in model: the logits are the channel means of each image, so each view scores differently."""

    def forward(self, images):
        return images.float().mean(dim=(2, 3)) / 32


def test_predict_batches_views_and_averages_each_group_per_image():
    rng = np.random.default_rng(0)
    split = CachedSplit(images=rng.integers(0, 256, (7, 40, 40, 3), dtype=np.uint8), labels=np.arange(7) % 3)
    views, groups = view_groups("ten_crop", {"crops": 5, "flip": True, "resize_ratio": 1.25, "scales": [1.0]}, 32)
    loader = view_loader(split, views, batch_size=3, num_workers=2)  # a short last batch, worker processes
    probabilities, labels = predict(ChannelMeans(), loader, groups)
    torch.testing.assert_close(labels, torch.as_tensor(split.labels))
    for index, image in enumerate(split.images):
        per_view = torch.stack([ChannelMeans()(torch.from_numpy(v.transpose(2, 0, 1)).unsqueeze(0))[0].softmax(0)
                                for v in apply(views, image)])
        torch.testing.assert_close(probabilities["none"][index], per_view[0])
        torch.testing.assert_close(probabilities["ten_crop"][index], per_view[1:].mean(dim=0))


def test_scores_and_report_files_agree(tmp_path):
    classes = ["cat", "dog", "eel"]
    probabilities = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 1, 1, 0])
    metrics = scores(probabilities, labels)
    assert set(metrics) == {"acc", "f1", "loss"}  # no top-5 with three classes
    assert metrics["acc"] == pytest.approx(0.5)
    assert metrics["loss"] == pytest.approx(-np.log([0.8, 0.7, 0.3, 0.1]).mean(), rel=1e-6)

    write_reports(tmp_path, probabilities, labels, classes, mode="flip")
    with open(tmp_path / "predictions.csv") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["index", "label", "predicted", "cat", "dog", "eel"]
    assert [r[:3] for r in rows[1:]] == [["0", "cat", "cat"], ["1", "dog", "dog"], ["2", "dog", "cat"],
                                         ["3", "cat", "eel"]]
    np.testing.assert_allclose(np.array([r[3:] for r in rows[1:]], float), probabilities.numpy(), rtol=1e-6)
    with open(tmp_path / "confusion_matrix.csv") as file:
        assert list(csv.reader(file)) == [["label", "cat", "dog", "eel"], ["cat", "1", "0", "1"],
                                          ["dog", "1", "1", "0"], ["eel", "0", "0", "0"]]
    with open(tmp_path / "per_class.csv") as file:
        per_class = {r["class"]: r for r in csv.DictReader(file)}
    assert per_class["cat"]["precision"] == "0.5" and per_class["cat"]["recall"] == "0.5"
    assert per_class["dog"]["precision"] == "1" and per_class["dog"]["recall"] == "0.5"
    assert [per_class[c]["support"] for c in classes] == ["2", "2", "0"]
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
