"""What each config key accepts, checked before a script does any work.

Every entry script starts with ``validate(cfg, <its schema>)``: the first value its schema does not
accept ends the program in one line that names the key, the value and what is allowed, e.g.
``Error: data.batch_size=0: must be an integer >= 1``, before any data is prepared or any MLflow
run is created. Without it a bad value fails late (after a run was created, at the first training
step) or with a traceback. Hydra already refuses unknown keys and options, so a section here lists
only the keys it checks and lets the others through.

A schema is a pydantic model per config section; each key's type is a ``rule``: a test and the
words for what it accepts. Checks that need two keys (the freeze depth against the model's stages,
the image size against the model's minimum) are model validators, run once every key passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationError, model_validator
from pydantic.functional_validators import PlainValidator
from pydantic_core import PydanticCustomError

from .errors import ConfigError

NOT_ALLOWED = "not_allowed"  # the error type of a rule; its message is "must be <what is allowed>"


def rule(allowed: str, test: Callable[[Any], bool]) -> Any:
    """A key's type: the values ``test`` accepts; any other is refused as "must be <allowed>"."""
    def check(value):
        if not test(value):
            raise PydanticCustomError(NOT_ALLOWED, "must be {allowed}", {"allowed": allowed})
        return value

    return Annotated[Any, PlainValidator(check)]


def refuse(key: str, value: Any, allowed: str) -> PydanticCustomError:
    """The error of a check across keys, naming the key it blames (a rule's key is where it stands)."""
    return PydanticCustomError(NOT_ALLOWED, "must be {allowed}", {"allowed": allowed, "key": key, "value": value})


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is not a count


def is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def is_numbers(value, length: int | None = None, test: Callable[[Any], bool] = is_number) -> bool:
    return (isinstance(value, list) and (length is None or len(value) == length) and len(value) > 0
            and all(test(v) for v in value))


def is_existing_file(value) -> bool:
    return isinstance(value, str) and Path(value).expanduser().is_file()


def is_file_name(value) -> bool:
    """A name that stays inside the folder it is put in: without '/' it cannot climb out ('..' plus a
    suffix or prefix, as every use here adds one, is an ordinary name)."""
    return isinstance(value, str) and value.strip() != "" and "/" not in value and "\0" not in value


def is_run_reference(value) -> bool:
    return isinstance(value, str) and value.startswith("runs:/") and len(value.strip("/")) > len("runs:")


# The types keys have. Hydra gives "abc" for seed=abc and 1.5 for batch_size=1.5: no int is coerced.
Count = rule("an integer >= 1", lambda v: is_integer(v) and v >= 1)               # sizes, epochs, batches
OptionalCount = rule("an integer >= 1, or null", lambda v: v is None or is_integer(v) and v >= 1)
WholePixels = rule("a whole number >= 1", lambda v: is_number(v) and v >= 1 and float(v).is_integer())
Index = rule("an integer >= 0", lambda v: is_integer(v) and v >= 0)
Workers = rule("an integer >= 0, or null (one per core)", lambda v: v is None or is_integer(v) and v >= 0)
Seed = rule("an integer from 0 to 4294967295", lambda v: is_integer(v) and 0 <= v < 2**32)  # numpy's range
Number = rule("a number", is_number)
Positive = rule("a number > 0", lambda v: is_number(v) and v > 0)
OptionalPositive = rule("a number > 0, or null", lambda v: v is None or is_number(v) and v > 0)
NonNegative = rule("a number >= 0", lambda v: is_number(v) and v >= 0)
Probability = rule("a number in [0, 1]", lambda v: is_number(v) and 0 <= v <= 1)
OptionalProbability = rule("a number in [0, 1], or null", lambda v: v is None or is_number(v) and 0 <= v <= 1)
BelowOne = rule("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1)
Flag = rule("true or false", lambda v: isinstance(v, bool))
Text = rule("a non-empty string", lambda v: isinstance(v, str) and v != "")
FileName = rule("a name without '/' (it names a file or folder, which must stay in its own folder)", is_file_name)
PathText = rule("a path", lambda v: isinstance(v, str) and v != "" or is_integer(v))  # Hydra reads 2024 as an int
ChannelMeans = rule("a list of 3 numbers (one per RGB channel)", lambda v: is_numbers(v, 3))
ChannelStds = rule("a list of 3 numbers > 0 (one per RGB channel)",
                   lambda v: is_numbers(v, 3, lambda s: is_number(s) and s > 0))
Checkpoint = rule("an existing checkpoint file or runs:/<mlflow run id>",
                  lambda v: is_existing_file(v) or is_run_reference(v))
ExistingFolder = rule("an existing folder", lambda v: isinstance(v, str) and Path(v).expanduser().is_dir())


class Section(BaseModel):
    """A config section: the keys declared are checked when present, the others pass."""
    model_config = ConfigDict(extra="allow")


TAG = "_target_="  # how by_target names its options in an error's location, which is not a config key


def by_target(options: Mapping[str, type[Section]]) -> Any:
    """A section whose keys depend on its ``_target_`` (a data source, a freeze policy); a target
    not listed (the user's own class) is checked as a plain section."""
    choices = tuple(Annotated[schema, Tag(TAG + target)] for target, schema in options.items())

    def target(value) -> str:
        chosen = value.get("_target_") if isinstance(value, Mapping) else None
        return TAG + (chosen if chosen in options else "other")

    return Annotated[Union[*choices, Annotated[Section, Tag(TAG + "other")]], Discriminator(target)]


# Sections ---------------------------------------------------------------------------------------
# A key given a default (None) may be absent: options differ in the keys they have.

class Paths(Section):
    root_dir: PathText = None
    data_dir: PathText = None
    output_dir: PathText = None
    mlflow_db: PathText = None
    mlflow_artifacts: PathText = None


class ShapesSource(Section):
    root: PathText = None
    image_size: Count = None
    train_size: Count = None
    val_size: Count = None
    test_size: Count = None
    seed: Seed = None
    radius: rule("[low, high]: the shapes' radius as fractions of the image side, 0 < low <= high <= 0.5",
                 lambda v: is_numbers(v, 2) and 0 < v[0] <= v[1] <= 0.5) = None
    max_offset: rule("null (a shape anywhere it fits) or a number from 0 to 0.5: how far its centre may be "
                     "from the image's centre, as a fraction of the side",
                     lambda v: v is None or is_number(v) and 0 <= v <= 0.5) = None


class ShapesFirstPerClass(ShapesSource):
    per_class: Count = None


class ImageFolderSource(Section):
    root: ExistingFolder = None
    cache_root: PathText = None
    stored_size: Count = None
    val_fraction: Probability = None
    test_fraction: Probability = None
    seed: Seed = None
    skip_bad_images: Flag = None


class Cifar10Source(Section):
    archive: PathText = None
    cache_root: PathText = None
    val_size: rule("an integer from 1 to 49999 (of the 50,000 training images)",
                   lambda v: is_integer(v) and 1 <= v < 50_000) = None
    seed: Seed = None
    download: Flag = None


DataSource = by_target({"cnnlab.data.ShapesSource": ShapesSource,
                        "cnnlab.data.ShapesFirstPerClass": ShapesFirstPerClass,
                        "cnnlab.data.ImageFolderSource": ImageFolderSource,
                        "cnnlab.data.Cifar10Source": Cifar10Source})


class Data(Section):
    source: DataSource = None
    image_size: Count = None
    batch_size: Count = None      # per device: each training process loads batches of this size
    eval_batch_size: OptionalCount = None
    num_workers: Workers = None
    mean: ChannelMeans = None
    std: ChannelStds = None


class PreparedData(Section):
    """src/prepare.py reads the source alone."""
    source: DataSource = None


class Distortion(Section):
    p: Probability = None         # how often it applies; its other arguments are albumentations'


class Scaling(Section):
    width: Positive = None
    depth: Positive = None
    resolution: Count = None
    dropout: Probability = None
    bn_eps: Positive = None
    bn_momentum: Probability = None
    phi: Number = None            # scaling=custom
    alpha: Positive = None
    beta: Positive = None
    gamma: Positive = None


class AuxHead(Section):
    pool: Count = None
    conv_chs: Count = None
    hidden_chs: Count = None
    dropout: Probability = None
    weight: NonNegative = None


class Model(Section):
    name: FileName = None         # names the cached features' folder (training/features.py)
    in_chans: Count = None
    pretrained: Any = None  # checked with the names in `weights` (pretrained_is_known below)
    weights: rule("a mapping of names to published weights, each with its url, mean and std, or null",
                  lambda v: v is None or isinstance(v, Mapping) and all(
                      isinstance(e, Mapping) and {"url", "mean", "std"} <= set(e) for e in v.values())) = None
    pretrained_cache_dir: rule("a path, or null", lambda v: v is None or isinstance(v, str) and v != "") = None
    width_mult: Positive = None
    depth_mult: Positive = None
    dropout: Probability = None
    drop_path_rate: Probability = None
    bn_eps: OptionalPositive = None
    bn_momentum: OptionalProbability = None
    min_resolution: OptionalCount = None
    head_pool: Count = None
    head_hidden: rule("a list of integers >= 1", lambda v: v == [] or is_numbers(v, test=lambda h: is_integer(h)
                                                                                  and h >= 1)) = None
    stages: rule("a non-empty list of stages", lambda v: isinstance(v, list) and len(v) > 0) = None
    aux_heads: Flag = None
    aux_head: AuxHead = None

    @model_validator(mode="after")
    def pretrained_is_known(self):
        value, names = self.pretrained, list(self.weights or {})
        if not (value is None or value is False or value in names or is_existing_file(value)
                or is_run_reference(value) or isinstance(value, str) and value.startswith(("http://", "https://"))):
            published = f"{' or '.join(names)} (this model's published weights), " if names else ""
            raise refuse("model.pretrained", value,
                         f"null, false, {published}a file, an http(s) URL or runs:/<mlflow run id>")
        return self


class FreezeStages(Section):
    depth: rule("an integer >= 0, or null (every stage)", lambda v: v is None or is_integer(v) and v >= 0) = None
    cache_features: Flag = None

    @model_validator(mode="after")
    def features_need_a_frozen_trunk(self):
        if self.cache_features and self.depth is not None:
            raise refuse("freeze.cache_features", True, "false unless freeze.depth=null (the whole trunk frozen, "
                                                        "as freeze=all_but_head)")
        return self


class GradualUnfreeze(Section):
    unfreeze_at: rule("a list of increasing epochs >= 1, e.g. [2,4,6]",
                      lambda v: isinstance(v, list) and all(is_integer(e) and e >= 1 for e in v)
                      and all(a < b for a, b in zip(v, v[1:]))) = None
    backbone_lr_factor: rule("a number in (0, 1]", lambda v: is_number(v) and 0 < v <= 1) = None


Freeze = by_target({"cnnlab.training.finetune.FreezeStages": FreezeStages,
                    "cnnlab.training.finetune.GradualUnfreeze": GradualUnfreeze})


class Optimizer(Section):
    lr: Positive = None
    weight_decay: NonNegative = None
    momentum: Probability = None
    nesterov: Flag = None
    betas: rule("a list of 2 numbers in [0, 1)", lambda v: is_numbers(v, 2, lambda b: is_number(b) and 0 <= b < 1)
                ) = None
    eps: Positive = None


class Scheduler(Section):
    warmup_fraction: Probability = None     # cosine
    final_lr_fraction: Probability = None
    pct_start: Probability = None           # one_cycle
    div_factor: Positive = None
    final_div_factor: Positive = None


PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true")
PRECISION_ALIASES = (32, 16, 64, "32", "16", "64", "bf16", "transformer-engine", "transformer-engine-float16")


class Trainer(Section):
    max_epochs: Count = None
    accelerator: rule("cpu, gpu, cuda, mps, tpu or auto", lambda v: v in ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
                      ) = None
    precision: rule(f"{', '.join(PRECISIONS[:-1])} or {PRECISIONS[-1]}",
                    lambda v: v in PRECISIONS or not isinstance(v, bool) and v in PRECISION_ALIASES) = None
    devices: rule("an integer >= 1, -1 (all), auto, or a list of device indices",
                  lambda v: is_integer(v) and (v >= 1 or v == -1) or v == "auto"
                  or is_numbers(v, test=lambda d: is_integer(d) and d >= 0)) = None
    num_nodes: Count = None
    log_every_n_steps: Count = None
    accumulate_grad_batches: Count = None
    check_val_every_n_epoch: OptionalCount = None
    deterministic: rule("true, false or warn", lambda v: isinstance(v, bool) or v == "warn") = None
    gradient_clip_val: rule("a number >= 0, or null", lambda v: v is None or is_number(v) and v >= 0) = None
    strategy: rule("auto, ddp, ddp_spawn, fsdp, deepspeed or another Lightning strategy name",
                   lambda v: isinstance(v, str) and v != "") = None
    sync_batchnorm: Flag = None
    channels_last: Flag = None
    compile: Flag = None

    @model_validator(mode="after")
    def sync_batchnorm_on_gpus(self):
        if self.sync_batchnorm and self.accelerator == "cpu":
            raise refuse("trainer.sync_batchnorm", True, "false on the CPU (SyncBatchNorm runs on GPUs only)")
        return self


class Tta(Section):
    crops: rule("1 (the centre) or 5 (the centre and the four corners)", lambda v: is_integer(v) and v in (1, 5)) = None
    flip: Flag = None
    resize_ratio: Positive = None
    scales: rule("a non-empty list of numbers > 0", lambda v: is_numbers(v, test=lambda s: is_number(s) and s > 0)
                 ) = None


class EvaluateOptions(Section):
    image_size: Count = None
    batch_size: Count = None


class CostOptions(Section):
    resolution: WholePixels = None
    num_classes: Count = None


class PreviewOptions(Section):
    images: Count = None
    versions: Count = None
    tile: Count = None
    distortion_row: Index = None


class CheckpointCallback(Section):
    filename: FileName = None     # under callbacks.checkpoint.dirpath, the run's checkpoints/


class Callbacks(Section):
    checkpoint: CheckpointCallback | None = None


# One schema per entry script: the sections that script reads ---------------------------------

class MlflowModel(Section):
    log: Flag = None
    registered_name: rule("a name for the Model Registry, or null (not registered)",
                          lambda v: v is None or isinstance(v, str) and v.strip() != "") = None


class Tracked(Section):
    """What every script that reads or writes the MLflow store is given."""
    experiment: Text = None
    tracking_uri: rule("an MLflow tracking URI, or null", lambda v: v is None or isinstance(v, str)) = None
    paths: Paths = None


def at_least_the_model_minimum(key: str, size, model: Model) -> None:
    if size is not None and model.min_resolution and size < model.min_resolution:
        raise refuse(key, size, f"an integer >= {model.min_resolution} (the smallest input {model.name} takes)")


class Train(Tracked):
    seed: Seed = None
    resume: rule("a run folder (holding checkpoints/last.ckpt), a checkpoint file, runs:/<MLflow run id>, auto, "
                 "or null",
                 lambda v: v is None or v == "auto" or is_run_reference(v) or is_existing_file(v)
                 or isinstance(v, str) and (Path(v).expanduser() / "checkpoints" / "last.ckpt").is_file()) = None
    label_smoothing: BelowOne = None
    scaling: Scaling = None  # first: its values reach data and model, whose keys would be blamed instead
    data: Data = None
    augment: dict[str, Distortion | None] = None
    model: Model = None
    freeze: Freeze = None
    optimizer: Optimizer = None
    scheduler: Scheduler | None = None
    trainer: Trainer = None
    callbacks: Callbacks = None
    mlflow_model: MlflowModel = None
    tta: rule("absent: test-time views are src/evaluate.py's (ckpt=... tta=flip)", lambda v: False) = None  # +tta=

    @model_validator(mode="after")
    def fits_the_model(self):
        if self.data and self.model:
            at_least_the_model_minimum("data.image_size", self.data.image_size, self.model)
        depth = getattr(self.freeze, "depth", None)
        if isinstance(self.freeze, FreezeStages) and depth is not None and self.model and self.model.stages:
            stages = len(self.model.stages)  # depth scaling repeats blocks within a stage, never adds stages
            if depth > stages:
                raise refuse("freeze.depth", depth, f"an integer from 0 to {stages} ({self.model.name} has {stages} "
                                                    "stages), or null (every stage)")
        return self


class Evaluate(Tracked):
    ckpt: Checkpoint = None
    data: Data = None
    tta: Tta = None
    evaluate: EvaluateOptions = None

    @model_validator(mode="after")
    def views_cover_the_crop(self):
        """The rule of data/augment.tta_views, met there only after the data was prepared."""
        if not (self.tta and self.evaluate and self.evaluate.image_size and self.tta.scales):
            return self
        size, ratio = self.evaluate.image_size, self.tta.resize_ratio or 1.0
        for scale in self.tta.scales:
            if round(size * ratio * scale) < size:
                raise refuse("tta.scales", self.tta.scales,
                             f"numbers that, times tta.resize_ratio={ratio}, resize the {size} px images to at least "
                             f"{size} px, the crop ({scale} resizes them to {round(size * ratio * scale)} px)")
        return self


class Predict(Tracked):
    ckpt: rule("an existing checkpoint file, runs:/<mlflow run id> or an exported .onnx file",
               lambda v: is_existing_file(v) or is_run_reference(v)) = None
    images: rule("an existing image file or folder",
                 lambda v: isinstance(v, str) and Path(v).expanduser().exists()) = None
    top_k: Count = None
    batch_size: Count = None
    num_workers: Workers = None
    shown: Index = None
    tta: Tta = None


class Export(Tracked):
    ckpt: Checkpoint = None
    format: rule("onnx", lambda v: v == "onnx") = None
    quantize: rule("null or int8", lambda v: v is None or v == "int8") = None
    calibration_images: Count = None
    opset: rule("an integer >= 18 (torch's dynamo exporter)", lambda v: is_integer(v) and v >= 18) = None
    data: Data = None


class Ensemble(Tracked):
    """members, weights and average are checked by evaluation/ensemble.py, before it reads or writes anything."""


class Report(Tracked):
    """The result folders are checked by pipeline/report.py, which says which stage to run."""


class Study(Tracked):
    """The study's params and trial folders are checked by studies/summary.py, which says which stage to run."""


class Prepare(Section):
    data: PreparedData = None


class Preview(Section):
    seed: Seed = None
    data: Data = None
    augment: dict[str, Distortion | None] = None
    preview: PreviewOptions = None


class Cost(Section):
    scaling: Scaling = None
    model: Model = None
    cost: CostOptions = None

    @model_validator(mode="after")
    def fits_the_model(self):
        if self.cost and self.model and self.cost.resolution is not None:
            at_least_the_model_minimum("cost.resolution", self.cost.resolution, self.model)
        return self


# Validation -------------------------------------------------------------------------------------

def validate(cfg: DictConfig, schema: type[Section]) -> None:
    """Refuse the first value of ``cfg`` that ``schema`` does not accept, with a ``ConfigError``
    naming the key, the value and what is allowed. Only the sections the schema names are resolved,
    so a script is not stopped by a section it never reads (cost.py by data.source.root=???)."""
    values = {key: resolved(cfg, key) for key in schema.model_fields if key in cfg.keys()}
    try:
        schema.model_validate(values)
    except ValidationError as error:
        raise ConfigError(one_line(error.errors()[0])) from None


def resolved(cfg: DictConfig, key: str):
    """The section or value at ``key`` as plain Python, interpolations resolved; ``???`` raises
    ``MissingMandatoryValue``, which the entry point reports as a value to give."""
    try:
        value = cfg[key]
        return OmegaConf.to_container(value, resolve=True, throw_on_missing=True) if OmegaConf.is_config(value) else value
    except MissingMandatoryValue:
        raise
    except OmegaConfBaseException as error:  # e.g. a resolver given a value it cannot compute with
        cause = error
        while cause is not None and not isinstance(cause, ConfigError):  # OmegaConf nests what resolvers raise
            cause = cause.__cause__ or cause.__context__
        if cause is not None:  # our resolver said what is wrong: say just that
            raise cause from None
        raise ConfigError(f"{error.full_key or key}: cannot be resolved: {str(error).splitlines()[0]}") from None


def one_line(error: Mapping) -> str:
    """``key=value: must be ...`` for the first error pydantic found."""
    context = error.get("ctx") or {}
    key = context.get("key") or ".".join(str(part) for part in error["loc"] if not str(part).startswith(TAG))
    value = context.get("value", error["input"])
    message = error["msg"] if error["type"] == NOT_ALLOWED else error["msg"][:1].lower() + error["msg"][1:]
    return f"{key}={as_written(value)}: {message}"


def as_written(value) -> str:
    """A value as it is written in an override: null, true, [1,2], abc."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(as_written(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {as_written(v)}" for k, v in value.items()) + "}"
    return str(value)
