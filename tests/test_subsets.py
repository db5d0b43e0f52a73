"""Training on the first images of each class (cnnlab/data/subsets.py), chosen from config as a user does,
checked against a count of the prepared labels."""

from collections import Counter

import numpy as np
import pytest
from hydra.utils import instantiate

from cnnlab.data.subsets import first_per_class
from cnnlab.errors import ConfigError

TRAIN_SIZE = 62  # six classes: two of 11 images, four of 10


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("subsets")


@pytest.fixture
def source(compose, root):
    """The data source a run builds from ``data=shapes_fewshot`` and these overrides."""
    def _source(*overrides: str):
        cfg = compose("data=shapes_fewshot", f"data.source.root={root}", f"data.source.train_size={TRAIN_SIZE}",
                      "data.source.val_size=12", "data.source.test_size=12", *overrides)
        return instantiate(cfg.data.source)

    return _source


@pytest.fixture
def subset(source):
    """The first ``per_class`` images of each class, chosen as a user does."""
    return lambda per_class: source("data.source._target_=cnnlab.data.ShapesFirstPerClass",
                                    f"+data.source.per_class={per_class}").prepare()


def first_of_each_class(labels, per_class: int) -> list[int]:
    """Walking the labels in order, the images whose class has been seen at most ``per_class`` times."""
    seen = Counter()
    kept = []
    for index, label in enumerate(labels.tolist()):
        seen[label] += 1
        if seen[label] <= per_class:
            kept.append(index)
    return kept


@pytest.mark.parametrize("per_class", [1, 4, 10])
def test_the_training_split_is_the_first_images_of_each_class_and_the_others_stay_whole(subset, per_class):
    part = subset(per_class)
    whole = part.whole
    expected = first_of_each_class(whole.split("train").labels, per_class)
    train = part.split("train")
    assert np.array_equal(train.labels, whole.split("train").labels[expected])
    assert np.array_equal(train.images, whole.split("train").images[expected])
    assert list(Counter(train.labels.tolist()).values()) == [per_class] * 6
    for name in ("val", "test"):
        assert np.array_equal(part.split(name).images, whole.split(name).images)
        assert np.array_equal(part.split(name).labels, whole.split(name).labels)
    assert part.classes == whole.classes and part.meta["train_per_class"] == per_class


def test_subsets_of_the_whole_sources_cache_are_nested_and_have_names_of_their_own(source, subset):
    small, large = subset(2), subset(5)
    assert small.whole.dir == large.whole.dir == source().prepare().dir  # prepared once, as the plain source does
    assert set(small.indices) < set(large.indices)
    # the frozen trunk's cached features and the run's data.cache are keyed on the folder name
    assert len({small.whole.dir.name, small.dir.name, large.dir.name}) == 3


@pytest.mark.parametrize("per_class, says", [(0, "must be an integer >= 1"),
                                             (11, "the training split has only 10 images of class ")])
def test_a_per_class_that_cannot_work_is_one_line_naming_it(subset, per_class, says):
    with pytest.raises(ConfigError) as refused:
        subset(per_class)
    message = str(refused.value)
    assert message.startswith(f"data.source.per_class={per_class}: ") and says in message
    assert "\n" not in message


def test_first_per_class_takes_each_class_in_its_order():
    labels = np.array([2, 0, 0, 1, 2, 1, 0, 2, 1])
    assert first_per_class(labels, 1, "abc").tolist() == [0, 1, 3]
    assert first_per_class(labels, 2, "abc").tolist() == [0, 1, 2, 3, 4, 5]
    assert first_per_class(labels, 3, "abc").tolist() == list(range(9))


def test_a_class_absent_from_the_training_split_is_refused():
    with pytest.raises(ConfigError, match="only 0 images of class c"):
        first_per_class(np.array([0, 1, 0, 1]), 1, ["a", "b", "c"])
