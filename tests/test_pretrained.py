"""Pretrained weights: torchvision's and timm's checkpoints give their logits, our runs round-trip.

torchvision and timm cannot be imported here. scripts/make_reference_fixtures.py ran them (in the
reference environment) on synthetic weights that ``synthetic_state_dict`` rebuilds exactly from a
key list, and stored the key lists of the full reference models (keys.json) and their logits.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from cnnlab.errors import ConfigError
from cnnlab.models import create_model, list_models
from cnnlab.models.pretrained import cached_file, load_pretrained, map_state_dict
from cnnlab.training.module import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "reference"
KEYS = json.loads((FIXTURES / "keys.json").read_text())

_spec = importlib.util.spec_from_file_location("make_reference_fixtures",
                                               ROOT / "scripts" / "make_reference_fixtures.py")
_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_script)
synthetic_state_dict = _script.synthetic_state_dict


def config(model: str, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"model={model}", *overrides])


def build(model: str, *overrides: str, num_classes: int = 1000, meta: bool = False, **kwargs):
    with torch.device("meta" if meta else "cpu"):
        return instantiate(config(model, *overrides).model, num_classes=num_classes, **kwargs)


def reference_weights(model: str, drop_counters: bool = False) -> dict[str, torch.Tensor]:
    keys = [(k, s) for k, s in KEYS[model] if not (drop_counters and k.endswith("num_batches_tracked"))]
    return synthetic_state_dict(keys)


def meta_weights(model: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in KEYS[model]}


SLOW = {"vgg11", "vgg11_bn", "efficientnet_b7"}  # 66-133 M parameters: seconds each
LOGITS = [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m
          for m in sorted(p.stem.removeprefix("logits_") for p in FIXTURES.glob("logits_*.pt"))]


@pytest.mark.parametrize("model", LOGITS)
def test_reference_weights_give_the_reference_logits(model, tmp_path):
    fixture = torch.load(FIXTURES / f"logits_{model}.pt", weights_only=True)
    weights = reference_weights(model)
    assert sum(float(v.double().sum()) for v in weights.values()) == fixture["weights_sum"]  # rebuilt exactly
    path = tmp_path / f"{model}.pth"
    torch.save(weights, path)
    del weights
    net = build(model, f"model.pretrained={path}").eval()
    with torch.no_grad():
        logits = net(fixture["input"])
    assert (logits - fixture["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("model", sorted(KEYS))
def test_every_tensor_of_the_full_reference_checkpoints_finds_its_place(model):
    net = build(model, meta=True)
    mapped, fresh = map_state_dict(net, meta_weights(model))
    ours = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    assert ours <= set(mapped) and not fresh
    dropped = [k for k, _ in KEYS[model] if k.startswith(("aux1.", "aux2."))]
    assert len(mapped) == len(KEYS[model]) - len(dropped)
    assert all(mapped[k].shape == v.shape for k, v in net.state_dict().items() if k in mapped)


def test_with_aux_heads_torchvision_googlenets_aux1_aux2_find_their_place_too():
    net = build("googlenet", "model.aux_heads=true", meta=True)
    mapped, fresh = map_state_dict(net, meta_weights("googlenet"))
    assert not fresh and len(mapped) == len(KEYS["googlenet"])  # nothing dropped
    assert set(mapped) == set(net.state_dict())
    assert mapped["aux_heads.inception4a.conv.0.weight"].shape == (128, 512, 1, 1)  # aux1 reads 4a
    assert mapped["aux_heads.inception4d.conv.0.weight"].shape == (128, 528, 1, 1)  # aux2 reads 4d


def test_googlenet_reference_weights_load_into_the_aux_heads_and_keep_the_main_logits(tmp_path):
    fixture = torch.load(FIXTURES / "logits_googlenet.pt", weights_only=True)
    weights = reference_weights("googlenet")
    torch.save(weights, tmp_path / "w.pth")
    net = build("googlenet", "model.aux_heads=true", f"model.pretrained={tmp_path / 'w.pth'}").eval()
    with torch.no_grad():
        logits, aux = net.forward_with_aux(fixture["input"])
    assert (logits - fixture["logits"]).abs().max() < 1e-4 and len(aux) == 2
    assert torch.equal(net.aux_heads["inception4a"].fc1.weight, weights["aux1.fc1.weight"])
    assert torch.equal(net.aux_heads["inception4d"].conv[1].running_var, weights["aux2.conv.bn.running_var"])
    # another number of classes: the aux classifiers start fresh like the main one, the rest loads
    torch.manual_seed(0)
    fresh = build("googlenet", "model.aux_heads=true", num_classes=7)
    torch.manual_seed(0)
    net = build("googlenet", "model.aux_heads=true", f"model.pretrained={tmp_path / 'w.pth'}", num_classes=7)
    assert torch.equal(net.aux_heads["inception4d"].fc2.weight, fresh.aux_heads["inception4d"].fc2.weight)
    assert torch.equal(net.aux_heads["inception4d"].fc1.weight, weights["aux2.fc1.weight"])


def test_a_checkpoint_without_aux_heads_does_not_fill_a_net_with_them():
    weights = {k: v for k, v in meta_weights("googlenet").items() if not k.startswith(("aux1.", "aux2."))}
    with pytest.raises(ConfigError, match="no tensor for googlenet's aux_heads.inception4a.conv.0.weight"):
        map_state_dict(build("googlenet", "model.aux_heads=true", meta=True), weights)


def test_older_checkpoints_without_batchnorm_counters_load():
    net = build("resnet18")
    mapped, _ = map_state_dict(net, reference_weights("resnet18", drop_counters=True))
    assert not any(k.endswith("num_batches_tracked") for k in mapped)


def test_a_new_number_of_classes_keeps_the_classifier_fresh(tmp_path):
    weights = reference_weights("mobilenet_v2")
    torch.save(weights, tmp_path / "w.pth")
    torch.manual_seed(0)
    fresh = build("mobilenet_v2", num_classes=7)
    torch.manual_seed(0)
    net = build("mobilenet_v2", f"model.pretrained={tmp_path / 'w.pth'}", num_classes=7)
    assert torch.equal(net.head.fc.weight, fresh.head.fc.weight) and net.head.fc.out_features == 7
    assert torch.equal(net.stem[0][0].weight, weights["features.0.0.weight"])
    assert torch.equal(net.stages[6][0].branch[2][1].running_var, weights["features.17.conv.3.running_var"])


def test_a_grey_model_sums_the_first_filters_and_sees_grey_as_the_rgb_model_does(tmp_path):
    torch.save(reference_weights("resnet18"), tmp_path / "w.pth")
    rgb = build("resnet18", f"model.pretrained={tmp_path / 'w.pth'}").eval()
    grey = build("resnet18", f"model.pretrained={tmp_path / 'w.pth'}", in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert (grey(x) - rgb(x.expand(-1, 3, -1, -1))).abs().max() < 1e-4


@pytest.mark.parametrize("model, weights_of, message", [
    # the paper's 5x5 branch cannot take torchvision's 3x3 "5x5" weights
    ("inception_v1", "googlenet",
     "torchvision GoogLeNet tensor inception3a.branch3.1.conv.weight (as stages.0.0.branches.2.1.0.weight) "
     "is 32x16x3x3 but inception_v1's stages.0.0.branches.2.1.0.weight is 32x16x5x5"),
    ("resnet18", "resnet50",
     "torchvision ResNet tensor layer1.0.conv1.weight (as stages.0.0.conv1.0.weight) is 64x64x1x1 "
     "but resnet18's stages.0.0.conv1.0.weight is 64x64x3x3"),
    ("resnet34", "resnet18",
     "torchvision ResNet checkpoint has no tensor for resnet34's stages.0.2.conv1.0.weight 64x64x3x3"),
    ("plain18", "resnet18",
     "torchvision ResNet tensor layer2.0.downsample.0.weight (as stages.1.0.shortcut.0.weight) 128x64x1x1 "
     "has no counterpart in plain18"),
    ("mobilenet_v2", "efficientnet_b0",
     "torchvision EfficientNet tensor features.1.0.block.1.fc1.weight (as stages.0.0.branch.1.fc1.weight) 8x32x1x1 "
     "has no counterpart in mobilenet_v2"),
    ("efficientnet_b0", "mobilenet_v2", "torchvision MobileNet v2 tensor features.1.conv."),
    ("vgg16", "vgg11",  # VGG-16's features.3 is the ReLU after its second conv
     "torchvision VGG tensor features.3.weight (as stages.0.1.2.weight) 128x64x3x3 has no counterpart in vgg16"),
])
def test_a_mismatch_is_a_config_error_naming_the_tensor_and_both_shapes(model, weights_of, message):
    with pytest.raises(ConfigError) as error:
        map_state_dict(build(model, meta=True), meta_weights(weights_of))
    assert message in str(error.value)


def _hashed_copy(tmp_path, weights) -> tuple[Path, str]:
    path = tmp_path / "weights.pth"
    torch.save(weights, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)


def cached_weights(tmp_path) -> tuple:
    """A small MobileNet v1, and its weights placed in a download cache as if fetched from a (made-up) URL:
    (the net, the cache folder, the URL, the file's SHA-256 prefix)."""
    net = build("mobilenet_v1", "scaling.width=0.25", num_classes=10)
    path, sha = _hashed_copy(tmp_path, {f"net.{k}": v for k, v in net.state_dict().items()})
    cache = tmp_path / "cache"
    cache.mkdir()
    path.rename(cache / f"mobilenet_v1-{sha[:8]}.pth")
    return net, cache, f"https://example.invalid/weights/mobilenet_v1-{sha[:8]}.pth", sha[:8]


def test_a_url_already_in_the_cache_is_read_from_there(tmp_path, offline):
    net, cache, url, _ = cached_weights(tmp_path)
    loaded = build("mobilenet_v1", "scaling.width=0.25", f"model.pretrained={url}",
                   f"model.pretrained_cache_dir={cache}", num_classes=10)
    assert torch.equal(loaded.head.fc.weight, net.head.fc.weight)


def test_a_cached_file_that_fails_its_checksum_is_refused(tmp_path, offline):
    (tmp_path / "resnet18-f37072fd.pth").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="does not match the SHA-256 prefix f37072fd"):
        cached_file("https://download.pytorch.org/models/resnet18-f37072fd.pth", tmp_path)


def test_hub_files_named_alike_are_cached_apart_and_a_fragment_gives_the_checksum(tmp_path, offline):
    url = "https://huggingface.co/timm/mobilenetv1_100.ra4_e3600_r224_in1k/resolve/main/model.safetensors"
    (tmp_path / "timm__mobilenetv1_100.ra4_e3600_r224_in1k__resolve__main__model.safetensors").write_bytes(b"x")
    assert cached_file(url, tmp_path).parent == tmp_path
    with pytest.raises(ConfigError, match="SHA-256 prefix 0123abcd"):
        cached_file(url + "#sha256=0123abcd", tmp_path)


def test_a_missing_file_or_unknown_layout_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pretrained(build("resnet_small", meta=True), tmp_path / "nope.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(ConfigError, match="unknown checkpoint layout"):
        load_pretrained(build("resnet_small"), tmp_path / "odd.pth")


@pytest.mark.slow
def test_a_run_started_from_weights_reloads_without_the_weights_file(compose, tmp_path):
    import pytorch_lightning as pl

    from cnnlab.training.run import build
    from conftest import tiny_overrides

    source_cfg = compose(*tiny_overrides(tmp_path))
    _, source = build(source_cfg)
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, weights)
    datamodule, module = build(compose(*tiny_overrides(tmp_path), f"model.pretrained={weights}"))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    weights.unlink()
    reloaded = ImageClassifier.load_from_checkpoint(tmp_path / "run.ckpt", map_location="cpu")
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_safetensors_files_load(compose, tmp_path):
    from safetensors.torch import save_file

    from cnnlab.training.run import build
    from conftest import tiny_overrides

    _, source = build(compose(*tiny_overrides(tmp_path)))
    path = tmp_path / "model.safetensors"
    save_file({f"net.{k}": v.contiguous() for k, v in source.net.state_dict().items()}, path)
    _, loaded = build(compose(*tiny_overrides(tmp_path), f"model.pretrained={path}"))
    for name, tensor in source.net.state_dict().items():
        assert torch.equal(tensor, loaded.net.state_dict()[name]), name


# Published weights: conf/model/*.yaml's `weights`, model.pretrained=imagenet ------------------------------------------

PUBLISHED = json.loads((FIXTURES / "published_weights.json").read_text())  # torchvision's and timm's own tables


def model_weights(model: str) -> dict:
    return config(model).model.weights or {}


@pytest.mark.parametrize("model", sorted(PUBLISHED))
def test_the_published_weights_are_torchvisions_and_timms_own(model):
    """imagenet is the library's DEFAULT weights, imagenet_v1 its IMAGENET1K_V1 where the default is another;
    the SHA-256 is the prefix torchvision's file name carries; GoogLeNet's mean and std are what its
    transform_input makes of ImageNet-normalised pixels."""
    reference, ours = PUBLISHED[model], model_weights(model)
    expected = {"imagenet": reference[reference["DEFAULT"]]}
    if "IMAGENET1K_V1" in reference and reference["DEFAULT"] != "IMAGENET1K_V1":
        expected["imagenet_v1"] = reference["IMAGENET1K_V1"]
    assert set(ours) == set(expected)
    for name, entry in expected.items():
        for key, value in entry.items():
            assert ours[name][key] == (pytest.approx(value) if key in ("mean", "std", "top1") else value), (name, key)
        file_name = entry["url"].rsplit("/", 1)[1]
        assert ours[name].sha256 == (file_name.rsplit("-", 1)[1].split(".")[0] if model != "mobilenet_v1" else None)


def test_models_without_published_weights_have_none():
    published = {name for name in list_models() if model_weights(name)}
    assert published == set(PUBLISHED)


def test_the_data_normalisation_follows_the_weights_unless_set(recwarn):
    from cnnlab.training.run import warn_if_normalised_unlike_the_weights

    assert list(config("googlenet", "model.pretrained=imagenet").data.mean) == [0.5, 0.5, 0.5]
    assert list(config("googlenet", "model.pretrained=imagenet").data.std) == [0.5, 0.5, 0.5]
    assert list(config("resnet50", "model.pretrained=imagenet", "data=cifar10").data.std) == [0.229, 0.224, 0.225]
    assert list(config("googlenet").data.std) == [0.25, 0.25, 0.25]  # no weights: the data's own
    assert list(config("googlenet", "data=cifar10").data.mean) == [0.4914, 0.4822, 0.4465]

    forced = config("googlenet", "model.pretrained=imagenet", "data.mean=[0.485,0.456,0.406]")
    datamodule = instantiate(forced.data)
    with pytest.warns(UserWarning, match=r"differ from the normalisation the imagenet weights of googlenet learnt on "
                                         r"\(mean \[0.5, 0.5, 0.5\], std \[0.5, 0.5, 0.5\]\)"):
        warn_if_normalised_unlike_the_weights(forced.model, datamodule)
    followed = config("googlenet", "model.pretrained=imagenet")
    warn_if_normalised_unlike_the_weights(followed.model, instantiate(followed.data))
    assert not [w for w in recwarn if "normalisation" in str(w.message)]


def test_pretrained_imagenet_loads_the_published_file_and_the_net_carries_its_preprocessing(tmp_path, offline):
    net, cache, url, sha = cached_weights(tmp_path)  # the URL stands in for the Hugging Face one
    overrides = ("scaling.width=0.25", f"model.weights.imagenet.url={url}", f"model.weights.imagenet.sha256={sha}",
                 f"model.pretrained_cache_dir={cache}", "model.pretrained=imagenet")
    loaded = build("mobilenet_v1", *overrides, num_classes=10)
    assert torch.equal(loaded.head.fc.weight, net.head.fc.weight)
    assert loaded.pretrained_cfg["url"] == url and loaded.pretrained_cfg["input_size"] == 224
    assert list(loaded.pretrained_cfg["mean"]) == [0.5, 0.5, 0.5] and build("mobilenet_v1").pretrained_cfg is None
    # the checksum is the entry's: a file that does not match it is refused
    with pytest.raises(ConfigError, match="does not match the SHA-256 prefix 00000000"):
        create_model("mobilenet_v1", num_classes=10, pretrained="imagenet", width_mult=0.25, pretrained_cache_dir=cache,
                     weights={"imagenet": {"url": url, "sha256": "00000000"}})


def test_a_name_that_is_no_published_weights_is_refused_in_one_line():
    from cnnlab import schema

    with pytest.raises(ConfigError, match=r"model.pretrained='imagenet21k' names no published weights of resnet50 "
                                          r"\(imagenet, imagenet_v1\) and no file"):
        create_model("resnet50", pretrained="imagenet21k")
    with pytest.raises(ConfigError, match=r"^model.pretrained=imagenet: must be null, false, a file, an http"):
        schema.validate(config("plain18", "model.pretrained=imagenet"), schema.Cost)
    with pytest.raises(ConfigError, match=r"^model.pretrained=imagenet21k: must be null, false, imagenet or "
                                          r"imagenet_v1 \(this model's published weights\), a file"):
        schema.validate(config("resnet50", "model.pretrained=imagenet21k"), schema.Cost)
    schema.validate(config("resnet50", "model.pretrained=imagenet_v1"), schema.Cost)
