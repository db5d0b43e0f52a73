"""The zoo without Hydra code: ``list_models`` and ``create_model``, like ``timm.create_model``.

A name is a file of conf/model/ (``model=<name>`` on the command line); ``create_model`` composes
it as a training composes it (its ``defaults``, no scaling preset) and builds it with the one
builder, so the net is the one ``python src/train.py model=<name>`` trains::

    import cnnlab
    cnnlab.list_models("resnet*")                  # ['resnet101', 'resnet152', 'resnet18', ...]
    net = cnnlab.create_model("mobilenet_v2", num_classes=10, width_mult=0.5)
    net = cnnlab.create_model("resnet18", pretrained="resnet18-f37072fd.pth")  # a file or URL

Keyword overrides are keys of the model's config (``width_mult``, ``depth_mult``, ``dropout``,
``in_chans``, ``aux_heads``, ``block_defaults={"basic": {"residual": False}}``, ...); a key the
config does not have is an error naming the ones it has.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"  # the project's conf/ (src/cnnlab/models/zoo.py)


def list_models(pattern: str = "*") -> list[str]:
    """The model names, sorted, that match a shell-style ``pattern`` (``"efficientnet_b*"``)."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if fnmatch.fnmatchcase(p.stem, pattern))


def model_config(name: str, **overrides) -> DictConfig:
    """conf/model/<name>.yaml composed as ``model=<name>`` composes it, resolved, with ``overrides`` merged."""
    if name not in list_models():
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    config = OmegaConf.create(OmegaConf.to_container(_compose(f"model={name}").model, resolve=True))
    unknown = sorted(set(overrides) - set(config) - {"_target_"})
    if unknown:
        raise ConfigError(f"{name} has no option {', '.join(unknown)}; its options: "
                          f"{', '.join(k for k in config if k != '_target_')}")
    return OmegaConf.merge(config, overrides)


def create_model(name: str, num_classes: int = 1000, pretrained: str | None = None, **overrides):
    """The ``Net`` that ``model=<name>`` builds, for ``num_classes`` classes; ``pretrained``: weights to
    load (a file or URL, as ``model.pretrained``); ``overrides``: keys of the model's config."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(model_config(name, pretrained=pretrained, **overrides), num_classes=num_classes)
    except InstantiationException as error:  # Hydra's wrapping adds nothing to our own one-line errors
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def _compose(*overrides: str) -> DictConfig:
    """conf/config.yaml with ``overrides``, also from inside a running Hydra app (whose state is kept)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    running = get_gh_backup()  # a script's own Hydra (the studies build models inside src/study.py)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    finally:
        restore_gh_from_backup(running)
