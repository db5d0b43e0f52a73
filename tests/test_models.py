"""The model zoo: every conf/model/*.yaml builds through Hydra, keeps the model contract, runs on
small inputs, and has the reference implementations' parameter counts to the unit."""

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from cnnlab.models import ClassifierHead, Net, count_parameters, make_divisible
from cnnlab.models.blocks import DropPath, Inception
from cnnlab.models.builder import scale_depth

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))

# torchvision 0.28 / timm 1.0.31 (mobilenet_v1), 1000 classes, 3 input channels
REFERENCE_COUNTS = {
    "vgg11": 132_863_336, "vgg13": 133_047_848, "vgg16": 138_357_544, "vgg19": 143_667_240,
    "vgg11_bn": 132_868_840, "vgg13_bn": 133_053_736, "vgg16_bn": 138_365_992, "vgg19_bn": 143_678_248,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "googlenet": 6_624_904, "inception_v1": 7_005_832,
    "mobilenet_v1": 4_231_976, "mobilenet_v2": 3_504_872,
    "efficientnet_b0": 5_288_548, "efficientnet_b1": 7_794_184, "efficientnet_b2": 9_109_994,
    "efficientnet_b3": 12_233_232, "efficientnet_b4": 19_341_616, "efficientnet_b5": 30_389_784,
    "efficientnet_b6": 43_040_704, "efficientnet_b7": 66_347_960,
}


def config(model: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"model={model}", *overrides])


def build(model: str, *overrides: str, num_classes: int = 1000, meta: bool = False, **kwargs) -> Net:
    """Build a model as training does; ``meta=True`` allocates no weights (counting 138M is instant)."""
    cfg = config(model, *overrides)
    with torch.device("meta" if meta else "cpu"):
        return instantiate(cfg.model, num_classes=num_classes, **kwargs)


@pytest.mark.parametrize("model", REFERENCE_COUNTS)
def test_parameter_counts_equal_the_reference_implementations(model):
    assert count_parameters(build(model, meta=True)) == REFERENCE_COUNTS[model]


@pytest.mark.parametrize("model", MODELS)
def test_every_model_option_builds_in_the_contract_shape(model):
    net = build(model, meta=True)
    assert isinstance(net, Net) and isinstance(net.stem, nn.Module)
    assert isinstance(net.stages, nn.ModuleList) and len(net.stages) >= 3
    assert isinstance(net.head, ClassifierHead) and net.head.fc.out_features == 1000
    assert net.name == model or model in ("efficientnet",)


# one of each family, slimmed (w=0.25) to stay fast; efficientnet_b0 is a fixed size by design
FAMILIES = ["vgg16", "vgg11_bn", "resnet18", "resnet50", "plain34", "googlenet", "inception_v1",
            "mobilenet_v1", "mobilenet_v2", "efficientnet", "efficientnet_b0"]


@pytest.mark.parametrize("model", FAMILIES)
def test_any_family_runs_on_32px_grayscale_with_any_number_of_classes(model):
    net = build(model, "scaling.width=0.25", num_classes=7, in_chans=1).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        features = net.forward_features(x)
        logits = net(x)
    assert features.ndim == 4 and features.shape[:1] == (1,)
    pooled_width = net.head.hidden[0].in_features if len(net.head.hidden) else net.head.fc.in_features
    assert features.shape[1] * net.head.pool.output_size ** 2 == pooled_width
    assert logits.shape == (1, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("model", ["resnet18", "googlenet", "mobilenet_v2", "efficientnet"])
def test_224px_inputs_end_in_a_7x7_feature_map(model):
    net = build(model, "scaling.width=0.25", num_classes=5).eval()
    with torch.no_grad():
        assert net.forward_features(torch.zeros(1, 3, 224, 224)).shape[-2:] == (7, 7)


@pytest.mark.parametrize("model", ["vgg11", "resnet18", "efficientnet"])
def test_too_small_an_input_is_a_clear_error_naming_the_minimum(model):
    net = build(model, "scaling.width=0.25", num_classes=3)
    with pytest.raises(ValueError, match="at least 32x32 px, got 16x16"):
        net(torch.zeros(1, 3, 16, 16))


def test_vgg_classifier_pools_to_7x7_with_two_hidden_layers():
    head = build("vgg16", "scaling.width=0.25", num_classes=3).head
    assert head.pool.output_size == 7
    assert [m.out_features for m in head.hidden if isinstance(m, nn.Linear)] == [4096, 4096]
    assert head.hidden[0].in_features == 128 * 7 * 7
    assert [m.p for m in head.hidden if isinstance(m, nn.Dropout)] == [0.5, 0.5] and head.dropout.p == 0


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_plain_twins_lack_only_the_projection_shortcuts(depth):
    residual, plain = build(f"resnet{depth}", meta=True), build(f"plain{depth}", meta=True)
    shortcuts = sum(count_parameters(m) for name, m in residual.named_modules() if name.endswith("shortcut"))
    assert shortcuts > 0
    assert count_parameters(plain) == count_parameters(residual) - shortcuts
    assert [len(s) for s in plain.stages] == [len(s) for s in residual.stages]
    assert not any(getattr(m, "residual", False) for m in plain.modules())


@pytest.mark.parametrize("depth", [18, 34])
def test_with_parameter_free_shortcuts_the_twins_have_equal_counts(depth):
    residual = build(f"resnet{depth}", "model.block_defaults.basic.shortcut=pad", num_classes=10)
    assert count_parameters(residual) == count_parameters(build(f"plain{depth}", meta=True, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    assert residual(x).shape == (2, 10)  # the zero-padded skip matches the stride-2 branch


def test_residual_blocks_add_their_input_and_plain_blocks_do_not():
    torch.manual_seed(0)
    residual = build("resnet18", "scaling.width=0.25").stages[0][0].eval()
    plain = build("plain18", "scaling.width=0.25").stages[0][0].eval()
    plain.load_state_dict(residual.state_dict())
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert torch.allclose(residual(x), torch.relu(residual.conv2(residual.conv1(x)) + x))
        assert torch.allclose(plain(x), torch.relu(plain.conv2(plain.conv1(x))))


def test_width_and_depth_scale_channels_and_repeats_of_any_family():
    base, scaled = build("resnet18", meta=True), build("resnet18", "scaling=b3", meta=True)
    assert [len(s) for s in base.stages] == [2, 2, 2, 2]
    assert [len(s) for s in scaled.stages] == [3, 3, 3, 3]            # ceil(2 * 1.4)
    assert scaled.stem[0][0].out_channels == 80                       # 64 * 1.2 = 76.8 -> 80
    assert scaled.head.fc.in_features == 616                          # 512 * 1.2 = 614.4 -> 616
    slim = build("mobilenet_v1", "scaling.width=0.5", meta=True)
    assert slim.head.fc.in_features == 512 and count_parameters(slim) < REFERENCE_COUNTS["mobilenet_v1"] / 3


def test_mobilenet_v2_keeps_1280_features_when_slimmed_but_widens_them():
    assert build("mobilenet_v2", "scaling.width=0.5", meta=True).head.fc.in_features == 1280
    assert build("mobilenet_v2", "scaling.width=1.4", meta=True).head.fc.in_features == 1792


def test_make_divisible_rounds_to_multiples_of_8_never_below_90_percent():
    assert make_divisible(76.8) == 80 and make_divisible(35.2) == 32 and make_divisible(448) == 448
    assert make_divisible(4) == 8             # never below the divisor
    assert make_divisible(10) == 16           # 8 would lose more than 10%
    for channels in (3.3, 17.6, 100, 614.4, 1000):
        rounded = make_divisible(channels)
        assert rounded % 8 == 0 and rounded >= 0.9 * channels
    assert scale_depth(2, 1.1) == 3 and scale_depth(3, 1.0) == 3 and scale_depth(1, 3.1) == 4


@pytest.mark.parametrize("b", range(8))
def test_efficientnet_bN_equals_the_base_table_under_scaling_bN(b):
    named = config(f"efficientnet_b{b}").model
    scaled = config("efficientnet", f"scaling=b{b}").model
    for key in ("width_mult", "depth_mult", "dropout", "bn_eps", "bn_momentum", "stages", "stem"):
        assert named[key] == scaled[key], key
    assert named.name == f"efficientnet_b{b}"


def test_efficientnet_bN_is_fixed_whatever_the_scaling_group():
    assert config("efficientnet_b3", "scaling=b7").model.width_mult == 1.2


def test_custom_scaling_follows_phi():
    scaling = config("efficientnet", "scaling=custom", "scaling.phi=2").scaling
    assert scaling.depth == pytest.approx(1.2 ** 2) and scaling.width == pytest.approx(1.1 ** 2)
    assert scaling.resolution == round(224 * 1.15 ** 2)
    assert math.isclose(1.2 * 1.1 ** 2 * 1.15 ** 2, 2, rel_tol=0.1)  # FLOPs ~ 2^phi
    net = build("efficientnet", "scaling=custom", "scaling.phi=2", meta=True)
    assert count_parameters(net) > REFERENCE_COUNTS["efficientnet_b2"]


def test_efficientnet_blocks_squeeze_to_a_quarter_of_their_input_and_use_silu():
    net = build("efficientnet_b0", meta=True)
    block = net.stages[1][0]  # 16 -> 24 channels, expanded to 96
    se = block.branch[2]
    assert se.fc1.in_channels == 96 and se.fc1.out_channels == 4
    assert any(isinstance(m, nn.SiLU) for m in block.modules())
    assert net.head.dropout.p == 0.2


def test_stochastic_depth_rises_linearly_over_the_blocks():
    net = build("efficientnet_b0", meta=True)
    rates = [m.p for m in net.modules() if isinstance(m, DropPath)]
    assert len(rates) == 16 and rates == pytest.approx([0.2 * i / 16 for i in range(16)])
    drop = DropPath(0.5)
    x = torch.ones(1000, 4)
    assert torch.equal(drop.eval()(x), x)
    kept = drop.train()(x)[:, 0]
    assert set(kept.unique().tolist()) <= {0.0, 2.0} and 0.3 < kept.mean().item() / 2 < 0.7


@pytest.mark.parametrize("model, eps, momentum", [
    ("efficientnet_b4", 1e-5, 0.1), ("efficientnet_b5", 1e-3, 0.01), ("googlenet", 1e-3, 0.1),
])
def test_batchnorm_settings_follow_the_reference(model, eps, momentum):
    norms = [m for m in build(model, meta=True).modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(bn.eps == eps and bn.momentum == momentum for bn in norms)


def test_googlenet_has_torchvisions_3x3_where_inception_v1_has_a_true_5x5():
    def five_by_five(model):
        module = next(m for m in build(model, meta=True).modules() if isinstance(m, Inception))
        return module.branches[2][1][0].kernel_size
    assert five_by_five("googlenet") == (3, 3) and five_by_five("inception_v1") == (5, 5)


def test_inception_without_1x1_reductions_costs_more_for_the_same_widths():
    cheap = build("inception_v1", "scaling.width=0.25", num_classes=4)
    costly = build("inception_v1", "scaling.width=0.25", "model.block_defaults.inception.reduce=false", num_classes=4)
    assert count_parameters(costly) > 2 * count_parameters(cheap)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert cheap.eval().forward_features(x).shape == costly.eval().forward_features(x).shape


def test_a_misspelt_block_option_is_a_config_error_naming_the_block():
    from cnnlab.errors import ConfigError

    def config_error(*overrides: str) -> str:
        with pytest.raises(Exception) as raised:
            build("resnet18", *overrides, meta=True)
        cause = raised.value
        while not isinstance(cause, ConfigError):  # hydra's instantiate wraps it
            cause = cause.__cause__
        return str(cause)

    assert "block 'conv_bn_act': got an unexpected keyword argument 'kernal'" in \
        config_error("+model.block_defaults.conv_bn_act={kernal: 3}")
    assert config_error("model.stages.0.block=nope").startswith("unknown block 'nope'")


# The Python API: cnnlab.create_model / list_models build what the configs build, without Hydra code.

def shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in net.state_dict().items()}


@pytest.mark.parametrize("model", MODELS)
def test_create_model_builds_what_the_config_builds(model):
    import cnnlab

    with torch.device("meta"):
        created = cnnlab.create_model(model, num_classes=7)
    configured = build(model, num_classes=7, meta=True)
    assert shapes(created) == shapes(configured) and created.name == configured.name


def test_create_model_overrides_are_the_configs_keys():
    import cnnlab

    with torch.device("meta"):
        slim = cnnlab.create_model("resnet18", num_classes=5, width_mult=0.25, depth_mult=2, in_chans=1)
        plain = cnnlab.create_model("resnet18", block_defaults={"basic": {"residual": False}})
        costly = cnnlab.create_model("inception_v1", block_defaults={"inception": {"reduce": False}})
    assert shapes(slim) == shapes(build("resnet18", "scaling.width=0.25", "scaling.depth=2", "model.in_chans=1",
                                        num_classes=5, meta=True))
    assert shapes(plain) == shapes(build("plain18", meta=True))
    assert count_parameters(costly) == count_parameters(
        build("inception_v1", "model.block_defaults.inception.reduce=false", meta=True))


def test_create_model_loads_pretrained_weights_from_a_file(tmp_path):
    import cnnlab

    torch.manual_seed(0)
    trained = cnnlab.create_model("resnet_small", num_classes=4)
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    torch.manual_seed(1)
    loaded = cnnlab.create_model("resnet_small", num_classes=4, pretrained=str(tmp_path / "weights.pth"))
    assert all(torch.equal(value, loaded.state_dict()[key]) for key, value in trained.state_dict().items())


def test_list_models_is_the_config_folder_filtered_by_a_pattern():
    import cnnlab

    assert cnnlab.list_models() == MODELS
    assert cnnlab.list_models("efficientnet_b*") == [f"efficientnet_b{i}" for i in range(8)]
    assert cnnlab.list_models("vgg1?_bn") == ["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
    assert cnnlab.list_models("alexnet*") == []


def test_create_model_refuses_an_unknown_name_or_option_in_one_line():
    import cnnlab
    from cnnlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^unknown model 'resnet19'; known models: efficientnet, "):
        cnnlab.create_model("resnet19")
    with pytest.raises(ConfigError, match=r"^resnet18 has no option widht_mult; its options: name, in_chans, "):
        cnnlab.create_model("resnet18", widht_mult=0.5)


def test_create_model_inside_a_running_hydra_app_leaves_its_config_alone(tmp_path):
    """The studies build models inside src/study.py's Hydra app: create_model composes conf/ beside it."""
    import cnnlab
    from hydra.core.global_hydra import GlobalHydra

    (tmp_path / "app.yaml").write_text("greeting: hello\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        with torch.device("meta"):
            net = cnnlab.create_model("mobilenet_v1", num_classes=3)
        assert GlobalHydra.instance().is_initialized()
        assert compose("app").greeting == "hello"  # the app's own config, as before
    assert net.head.fc.out_features == 3
