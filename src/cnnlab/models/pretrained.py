"""Pretrained weights: torchvision's and timm's ImageNet checkpoints, or one of our own runs.

``model.pretrained=`` names the model's published weights (``imagenet``: an entry of ``model.weights``
in conf/model/, with its URL, SHA-256 and the preprocessing it was trained with), a local file, an
http(s) URL or one of our MLflow runs (``runs:/<run id>``
for its best checkpoint, ``runs:/<run id>/last/last.ckpt`` for another artifact). What the file holds is read from its
keys, not declared: a Lightning checkpoint of a cnnlab run (``state_dict`` with ``net.*`` keys), a
bare cnnlab state dict (``stem.*``, ``stages.*``, ``head.*``), or a torchvision ResNet, VGG,
GoogLeNet, MobileNet v2 or EfficientNet, or timm's MobileNet v1 (``mobilenetv1_100``). Each
reference layout has a renaming rule below that turns its key into ours; the rules only rename,
so the builder's stage tables are what make the tensors fit.

Loading is all or nothing: every tensor of the checkpoint must land on a tensor of the model with
the same shape and every tensor of the model must be given, or a ``ConfigError`` names the first
that does not fit. Two differences are intended and allowed:
- the classifier (``head.fc``) is left at its fresh initialisation when the number of classes
  differs (transfer learning to a new task);
- a 1-channel model sums the first conv's RGB filters: a grey image repeated into three channels
  gives the same activations as the summed filter on one channel.
BatchNorm's ``num_batches_tracked`` counters are optional (torchvision's older files lack them).
torchvision GoogLeNet's auxiliary classifiers (``aux1``, ``aux2``) load into a net built with
``model.aux_heads=true`` (its first and second aux head, their classifiers fresh like ``head.fc``
when the classes differ) and are dropped from a net without aux heads.

URLs are downloaded once into a cache directory (default ``$TORCH_HOME/hub/checkpoints``, usually
``~/.cache/torch/hub/checkpoints``, the folder torchvision itself uses, so weights it already
fetched are reused). A file name carrying a SHA-256 prefix (torchvision's ``resnet18-f37072fd.pth``)
is verified on download and again when found in the cache; a URL ending ``#sha256=<hex>`` gives
the prefix for files named without one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import torch
from safetensors.torch import load_file
from torch import nn

from ..checkpoints import read_checkpoint
from ..errors import ConfigError

log = logging.getLogger(__name__)

HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")  # torchvision: <name>-<sha256 prefix>.pth
OPTIONAL = ("num_batches_tracked",)
HEAD = ("head.fc.weight", "head.fc.bias")
AUX_FC = re.compile(r"aux_heads\.\w+\.fc2\.(weight|bias)")  # the aux heads' own classifiers


def _is_classifier(key: str | None) -> bool:
    return key is not None and (key in HEAD or AUX_FC.fullmatch(key) is not None)


# ---------------------------------------------------------------------------------------------
# Reading: path or URL -> a flat state dict
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _expected_hash(url: str) -> str | None:
    fragment = urlsplit(url).fragment
    if fragment.startswith("sha256="):
        return fragment.removeprefix("sha256=").lower()
    found = HASH_IN_NAME.search(Path(urlsplit(url).path).name)
    return found.group(1) if found else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def cached_file(url: str, cache_dir: str | Path | None = None) -> Path:
    """The local copy of ``url``: downloaded (and verified) once, then reused from the cache."""
    parts = urlsplit(url)
    name = Path(parts.path).name
    if not name:
        raise ConfigError(f"pretrained URL {url!r} does not end in a file name")
    if not HASH_IN_NAME.search(name) and parts.path.count("/") > 1:
        # hub URLs name every file model.safetensors: keep the path so they do not collide
        name = parts.path.strip("/").replace("/", "__")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target, expected = cache / name, _expected_hash(url)
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", url, target)
        if expected is None:
            log.warning("no SHA-256 for %s (add #sha256=<hex> to the URL to verify it)", url)
        try:  # torch.hub checks the prefix and writes through a temporary file, so no half file remains
            torch.hub.download_url_to_file(url.split("#")[0], str(target), hash_prefix=expected, progress=False)
        except RuntimeError as error:  # torch.hub's "invalid hash value"
            raise ConfigError(f"downloaded {url} does not match its SHA-256 prefix {expected}: {error}") from None
        except OSError as error:
            raise ConfigError(f"cannot download pretrained weights {url}: {error}") from None
    elif expected is not None and not _sha256(target).startswith(expected):
        raise ConfigError(f"cached {target} does not match the SHA-256 prefix {expected} of {url}; "
                          "delete it to download it again")
    return target


def weights_source(pretrained: str, weights: Mapping[str, Mapping] | None, model: str) -> str:
    """Where ``pretrained`` is: the URL of the published weights it names (their SHA-256 prefix as the
    URL's ``#sha256=``), else itself (a file, URL or run). A bare word that names neither is refused."""
    entry = (weights or {}).get(pretrained)
    if entry is not None:
        return entry["url"] + (f"#sha256={entry['sha256']}" if entry.get("sha256") else "")
    if re.fullmatch(r"\w+", pretrained) and not Path(pretrained).exists():
        names = ", ".join(weights or {}) or "none"
        raise ConfigError(f"model.pretrained={pretrained!r} names no published weights of {model} ({names}) "
                          "and no file")
    return pretrained


def read_state_dict(source: str | Path, cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name, from a file or a URL; Lightning checkpoints are unwrapped."""
    source = str(source)
    if source.startswith("runs:/"):
        from ..tracking import run_artifact  # MLflow is imported only when a run is named

        path = run_artifact(source)
    elif re.match(r"https?://", source):
        path = cached_file(source, cache_dir)
    else:
        path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"pretrained weights {source!r} not found")
    if path.suffix == ".safetensors":
        return load_file(path)
    checkpoint = read_checkpoint(path)
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]  # Lightning
    if not isinstance(checkpoint, Mapping) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise ConfigError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(checkpoint)


# ---------------------------------------------------------------------------------------------
# Layouts: each turns a reference key into the name of our tensor, or None to drop it
# ---------------------------------------------------------------------------------------------

def _sub(rules: list[tuple[str, str]]) -> Callable[[str], str | None]:
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]

    def rename(key: str) -> str | None:
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                return pattern.sub(replacement, key)
        return key  # unknown keys pass through and then fail to match, naming themselves

    return rename


def _stage_index(net: nn.Module, flat: int, skip_first: int = 0) -> tuple[int, int] | None:
    """The (stage, block) of the ``flat``-th block counted over all stages (torchvision's flat ``features``)."""
    flat -= skip_first
    for s, stage in enumerate(net.stages):
        if 0 <= flat < len(stage):
            return s, flat
        flat -= len(stage)
    return None  # more blocks than the model has: the key keeps its name and fails to match


def _resnet(net: nn.Module) -> Callable[[str], str | None]:
    rename = _sub([
        (r"conv1\.weight", r"stem.0.0.weight"),
        (r"bn1\.(\w+)", r"stem.0.1.\1"),
        (r"layer(\d+)\.(\d+)\.conv(\d)\.weight", r"stages.\1.\2.conv\3.0.weight"),
        (r"layer(\d+)\.(\d+)\.bn(\d)\.(\w+)", r"stages.\1.\2.conv\3.1.\4"),
        (r"layer(\d+)\.(\d+)\.downsample\.(\d)\.(\w+)", r"stages.\1.\2.shortcut.\3.\4"),
        (r"fc\.(\w+)", r"head.fc.\1"),
    ])

    def layer_from_1(key: str) -> str | None:  # layer1 is our stages.0
        key = rename(key)
        return re.sub(r"^stages\.(\d+)", lambda m: f"stages.{int(m.group(1)) - 1}", key)

    return layer_from_1


def _vgg(net: nn.Module) -> Callable[[str], str | None]:
    # torchvision's `features` is one flat Sequential: conv, [bn], relu per conv layer, then a pool
    flat = {}
    for s, stage in enumerate(net.stages):
        for b, block in enumerate(stage):
            children = list(block.children()) if isinstance(block, nn.Sequential) else [block]
            for c, child in enumerate(children):
                if not isinstance(child, nn.Identity):  # our VGG without BN keeps an Identity in its place
                    flat[len(flat)] = f"stages.{s}.{b}.{c}" if isinstance(block, nn.Sequential) else f"stages.{s}.{b}"
    head = {"classifier.0": "head.hidden.0", "classifier.3": "head.hidden.3", "classifier.6": "head.fc"}

    def rename(key: str) -> str | None:
        module, _, tensor = key.rpartition(".")
        if m := re.fullmatch(r"features\.(\d+)", module):
            module = flat.get(int(m.group(1)), module)
        return f"{head.get(module, module)}.{tensor}"

    return rename


def _googlenet(net: nn.Module) -> Callable[[str], str | None]:
    modules = {"conv1": "stem.0", "conv2": "stem.2", "conv3": "stem.3",
               "inception3a": "stages.0.0", "inception3b": "stages.0.1",
               **{f"inception4{c}": f"stages.1.{i + 1}" for i, c in enumerate("abcde")},
               "inception5a": "stages.2.1", "inception5b": "stages.2.2"}
    conv_bn = {"conv": "0", "bn": "1"}
    aux = {f"aux{i + 1}": f"aux_heads.{name}" for i, name in enumerate(getattr(net, "aux_heads", None) or {})}

    def rename(key: str) -> str | None:
        if key.startswith(("aux1.", "aux2.")):  # aux1.conv.conv|bn.* -> aux_heads.<first>.conv.0|1.*
            if not aux:
                return None  # a net without aux heads: dropped
            head, *rest = key.split(".")
            if head not in aux:
                return key
            if rest[0] == "conv":
                rest = ["conv", conv_bn.get(rest[1], rest[1]), *rest[2:]]
            return ".".join([aux[head], *rest])
        if key.startswith("fc."):
            return "head." + key
        parts = key.split(".")
        if parts[0] not in modules:
            return key
        out = [modules[parts[0]]]
        if parts[1].startswith("branch"):  # branchN[.i].conv|bn -> branches.N-1[.i].0|1
            out.append(f"branches.{int(parts[1][6:]) - 1}")
            parts = parts[2:]
            if parts[0].isdigit():
                out.append(parts.pop(0))
        else:
            parts = parts[1:]
        return ".".join([*out, conv_bn.get(parts[0], parts[0]), *parts[1:]])

    return rename


def _mobilenet_v2(net: nn.Module) -> Callable[[str], str | None]:
    last = len(net.stages) - 1

    def rename(key: str) -> str | None:
        if m := re.fullmatch(r"classifier\.1\.(\w+)", key):
            return f"head.fc.{m.group(1)}"
        if m := re.fullmatch(r"features\.0\.(.+)", key):
            return f"stem.0.{m.group(1)}"
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if not m:
            return key
        where = _stage_index(net, int(m.group(1)), skip_first=1)
        if where is None:
            return key
        (s, b), rest = where, m.group(2)
        if s == last:  # the final 1x1 conv-bn-relu6
            return f"stages.{s}.{b}.{rest}"
        # conv: [expand conv-bn-act], depthwise conv-bn-act, project conv, project bn (flat)
        m = re.fullmatch(r"conv\.(\d+)\.(.+)", rest)
        if not m or not hasattr(net.stages[s][b], "branch"):
            return key
        i, tail = int(m.group(1)), m.group(2)
        n_act = len(net.stages[s][b].branch) - 1  # conv-bn-act layers before our project ConvBnAct
        if i < n_act:
            return f"stages.{s}.{b}.branch.{i}.{tail}"
        return f"stages.{s}.{b}.branch.{n_act}.{i - n_act}.{tail}"

    return rename


def _efficientnet(net: nn.Module) -> Callable[[str], str | None]:
    last = len(net.stages)  # torchvision's features.8 is our final stage (7)
    return _sub([
        (r"features\.0\.(.+)", r"stem.0.\1"),
        (rf"features\.{last}\.(.+)", rf"stages.{last - 1}.0.\1"),
        *[(rf"features\.{s + 1}\.(\d+)\.block\.(.+)", rf"stages.{s}.\1.branch.\2") for s in range(last - 1)],
        (r"classifier\.1\.(\w+)", r"head.fc.\1"),
    ])


def _timm_mobilenet_v1(net: nn.Module) -> Callable[[str], str | None]:
    return _sub([
        (r"conv_stem\.weight", r"stem.0.0.weight"),
        (r"bn1\.(\w+)", r"stem.0.1.\1"),
        (r"blocks\.(\d+)\.(\d+)\.conv_dw\.weight", r"stages.\1.\2.0.0.weight"),
        (r"blocks\.(\d+)\.(\d+)\.bn1\.(\w+)", r"stages.\1.\2.0.1.\3"),
        (r"blocks\.(\d+)\.(\d+)\.conv_pw\.weight", r"stages.\1.\2.1.0.weight"),
        (r"blocks\.(\d+)\.(\d+)\.bn2\.(\w+)", r"stages.\1.\2.1.1.\3"),
        (r"classifier\.(\w+)", r"head.fc.\1"),
    ])


def _cnnlab(net: nn.Module) -> Callable[[str], str | None]:
    return lambda key: key.removeprefix("net.") if key.startswith("net.") else None  # drop the module's others


# (name, a key only that layout has, its rule); the first whose key is present wins
LAYOUTS: list[tuple[str, str, Callable[[nn.Module], Callable[[str], str | None]]]] = [
    ("cnnlab run (Lightning checkpoint)", "net.head.fc.weight", _cnnlab),
    ("cnnlab", "head.fc.weight", lambda net: lambda key: key),
    ("torchvision ResNet", "layer1.0.conv1.weight", _resnet),
    ("torchvision VGG", "classifier.6.weight", _vgg),
    ("torchvision GoogLeNet", "inception3a.branch1.conv.weight", _googlenet),
    ("torchvision MobileNet v2", "features.1.conv.0.0.weight", _mobilenet_v2),
    ("torchvision EfficientNet", "features.1.0.block.0.0.weight", _efficientnet),
    ("timm MobileNet v1", "blocks.0.0.conv_dw.weight", _timm_mobilenet_v1),
]


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, Callable]:
    for name, marker, rule in LAYOUTS:
        if marker in state_dict:
            return name, rule
    first = ", ".join(list(state_dict)[:3])
    raise ConfigError(f"unknown checkpoint layout (first keys: {first}); known: "
                      + ", ".join(name for name, _, _ in LAYOUTS))


# ---------------------------------------------------------------------------------------------
# Matching and loading
# ---------------------------------------------------------------------------------------------

def _shape(tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def map_state_dict(net: nn.Module, source: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename ``source`` to ``net``'s tensors and check every shape.

    Returns the tensors to load and the names of ours left at their initialisation (the
    classifier when the classes differ). Works on meta tensors too (shape checks without weights).
    """
    layout, make_rule = detect_layout(source)
    rename = make_rule(net)
    name = getattr(net, "name", type(net).__name__)
    ours = net.state_dict()
    renamed = {key: rename(key) for key in source}
    given = {target: source[key] for key, target in renamed.items() if _is_classifier(target)}
    # a classifier for another number of classes stays fresh (transfer learning); any other width must fit
    kept = [k for k in given if k in ours and given[k].shape != ours[k].shape
            and given[k].shape[1:] == ours[k].shape[1:]]
    if kept:
        log.info("%s: %d classes in the checkpoint, %d here: the classifier%s start%s fresh", name,
                 given[kept[0]].shape[0], ours[kept[0]].shape[0], *(("s", "") if len(kept) > 2 else ("", "s")))
    first_conv = next((k for k, v in ours.items() if v.ndim == 4), None)

    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in source.items():  # in the checkpoint's order: the first misfit is named
        target = renamed[key]
        if target is None or target in kept:
            continue
        via = f" (as {target})" if target != key else ""
        if target not in ours:
            if target.endswith(OPTIONAL):
                continue
            raise ConfigError(f"{layout} tensor {key}{via} {_shape(tensor)} has no counterpart in {name}")
        if target in mapped:
            raise ConfigError(f"{layout} tensors {origin[target]} and {key} both map to {target}")
        if target == first_conv and tensor.ndim == 4 and tensor.shape[1] == 3 and ours[target].shape[1] == 1 \
                and tensor.shape[0] == ours[target].shape[0] and tensor.shape[2:] == ours[target].shape[2:]:
            tensor = tensor.sum(dim=1, keepdim=True)  # grey = R = G = B: the same activations
        if tensor.shape != ours[target].shape:
            raise ConfigError(f"{layout} tensor {key}{via} is {_shape(tensor)} but {name}'s {target} is "
                              f"{_shape(ours[target])}")
        mapped[target], origin[target] = tensor, key

    for key, tensor in ours.items():
        if key not in mapped and key not in kept and not key.endswith(OPTIONAL):
            raise ConfigError(f"{layout} checkpoint has no tensor for {name}'s {key} {_shape(tensor)}")
    return mapped, kept


def load_pretrained(net: nn.Module, source: str | Path, cache_dir: str | Path | None = None) -> nn.Module:
    """Load a checkpoint (file or URL) into ``net`` in place; see the module docstring."""
    mapped, kept = map_state_dict(net, read_state_dict(source, cache_dir))
    with torch.no_grad():
        for key, target in net.state_dict(keep_vars=True).items():
            if key in mapped:
                target.copy_(mapped[key].to(target.dtype))
    log.info("loaded %d tensors from %s into %s%s", len(mapped), source, getattr(net, "name", "the model"),
             f" (fresh: {', '.join(kept)})" if kept else "")
    return net
