"""Building blocks shared by every architecture.

Every block has the signature ``Block(in_chs, out_chs, stride=1, **options)`` so that the
builder can stack any of them from a stage table. ``BLOCKS`` is the one registry that maps
the names used in ``conf/model/*.yaml`` to these classes. A block whose width follows from its
options (pooling, inception) takes ``out_chs=None`` and reports its width as ``.out_chs``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError  # a ValueError that entry points report in one line

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}


def make_act(act: bool | str | None) -> nn.Module:
    """``True`` means ReLU (the classic default), ``False``/``None`` no activation (a linear layer)."""
    if act is True:
        act = "relu"
    if not act:
        return nn.Identity()
    if act not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act](inplace=True)


class ConvBnAct(nn.Sequential):
    """conv -> BatchNorm -> activation, with "same" padding for odd kernels.

    The conv has no bias when BatchNorm follows (its shift makes a bias redundant); ``bias=True``
    keeps one anyway, as torchvision's VGG-BN does, so that its weights load.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, kernel: int = 3, groups: int = 1,
                 act: bool | str = True, bn: bool = True, bias: bool | None = None):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel, stride, padding=kernel // 2, groups=groups,
                      bias=not bn if bias is None else bias),
            nn.BatchNorm2d(out_chs) if bn else nn.Identity(),
            make_act(act),
        )


class MaxPool(nn.MaxPool2d):
    """Max pooling as a block; channels pass through unchanged.

    Padding defaults to "same" for odd kernels and none for the 2x2 pools of VGG; GoogLeNet
    uses ``padding=0, ceil_mode=True`` like torchvision, which gives the same feature-map sizes.
    """

    def __init__(self, in_chs: int, out_chs: int | None = None, stride: int = 2, kernel: int = 3,
                 padding: int | None = None, ceil_mode: bool = False):
        if out_chs not in (None, in_chs):
            raise ConfigError(f"max_pool keeps channels: got in_chs={in_chs}, out_chs={out_chs}")
        super().__init__(kernel, stride, padding=(kernel - 1) // 2 if padding is None else padding,
                         ceil_mode=ceil_mode)
        self.out_chs = in_chs


class DropPath(nn.Module):
    """Stochastic depth: in training, skip a residual branch for a random subset of the samples.

    The builder sets ``p`` afterwards, rising linearly over the network's blocks.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        # rescaled so that the expected output is unchanged; the (N, 1, 1, 1) mask is scaled, not x
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PadShortcut(nn.Module):
    """The paper's parameter-free shortcut (option A): subsample, then zero-pad the new channels.

    With it a residual net has exactly the parameters of its plain twin.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.extra_chs, self.stride = out_chs - in_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra_chs))


def make_shortcut(in_chs: int, out_chs: int, stride: int, kind: str) -> nn.Module:
    """Identity when shapes match; otherwise a strided 1x1 projection (torchvision) or zero padding."""
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    if kind == "projection":
        return ConvBnAct(in_chs, out_chs, stride, kernel=1, act=False)
    if kind == "pad":
        return PadShortcut(in_chs, out_chs, stride)
    raise ConfigError(f"unknown shortcut {kind!r}; known: projection, pad")


class ResidualBlock(nn.Module):
    """a[l+n] = g(branch(a[l]) + shortcut(a[l])); ``residual=False`` drops the skip (the "plain" twin)."""

    def add_skip(self, in_chs: int, out_chs: int, stride: int, residual: bool, shortcut: str):
        """Called by subclasses after their convs, so the modules print in data-flow order."""
        self.residual = residual
        self.shortcut = make_shortcut(in_chs, out_chs, stride, shortcut) if residual else nn.Identity()
        self.drop_path = DropPath()
        self.act = nn.ReLU(inplace=True)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        z = self.branch(x)
        if self.residual:
            # in place: z is a fresh tensor no backward needs (a BatchNorm's output or DropPath's)
            z = self.drop_path(z)
            z += self.shortcut(x)
        return self.act(z)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs with a skip connection (ResNet-18/34)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, residual: bool = True,
                 shortcut: str = "projection"):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, stride)
        self.conv2 = ConvBnAct(out_chs, out_chs, act=False)
        self.add_skip(in_chs, out_chs, stride, residual, shortcut)

    def branch(self, x):
        return self.conv2(self.conv1(x))


class Bottleneck(ResidualBlock):
    """1x1 reduce -> 3x3 -> 1x1 expand, with a skip (ResNet-50/101/152).

    The stride sits on the 3x3 conv as in torchvision's "v1.5" (same parameters as the paper's
    stride on the first 1x1, a little more compute, better accuracy).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: int = 4,
                 residual: bool = True, shortcut: str = "projection"):
        super().__init__()
        mid_chs = out_chs // expansion
        self.conv1 = ConvBnAct(in_chs, mid_chs, kernel=1)
        self.conv2 = ConvBnAct(mid_chs, mid_chs, stride)
        self.conv3 = ConvBnAct(mid_chs, out_chs, kernel=1, act=False)
        self.add_skip(in_chs, out_chs, stride, residual, shortcut)

    def branch(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class Inception(nn.Module):
    """Four parallel branches concatenated: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3 maxpool->1x1.

    Option names follow the columns of the GoogLeNet paper's table 1. The 1x1 reductions in front
    of the 3x3 and 5x5 convs are what make the module affordable; ``reduce=False`` removes them
    (for the cost comparison). ``b5_kernel=3`` reproduces torchvision's GoogLeNet, whose "5x5"
    branch is a 3x3 conv.
    """

    def __init__(self, in_chs: int, out_chs: int | None = None, stride: int = 1, *, b1_chs: int,
                 b3_red_chs: int, b3_chs: int, b5_red_chs: int, b5_chs: int, pool_chs: int,
                 b5_kernel: int = 5, reduce: bool = True):
        super().__init__()
        if stride != 1:
            raise ConfigError("inception keeps the resolution; downsample with a max_pool block")
        self.out_chs = b1_chs + b3_chs + b5_chs + pool_chs
        if out_chs not in (None, self.out_chs):
            raise ConfigError(f"inception branches give {self.out_chs} channels, not out_chs={out_chs}")

        def reduced(red_chs: int, chs: int, kernel: int) -> nn.Module:
            if not reduce:
                return ConvBnAct(in_chs, chs, kernel=kernel)
            return nn.Sequential(ConvBnAct(in_chs, red_chs, kernel=1), ConvBnAct(red_chs, chs, kernel=kernel))

        self.branches = nn.ModuleList([
            ConvBnAct(in_chs, b1_chs, kernel=1),
            reduced(b3_red_chs, b3_chs, 3),
            reduced(b5_red_chs, b5_chs, b5_kernel),
            nn.Sequential(nn.MaxPool2d(3, 1, padding=1, ceil_mode=True), ConvBnAct(in_chs, pool_chs, kernel=1)),
        ])

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class DepthwiseSeparable(nn.Sequential):
    """MobileNet v1: a 3x3 depthwise conv (one filter per channel) then a 1x1 pointwise conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, kernel: int = 3, act: bool | str = True):
        super().__init__(
            ConvBnAct(in_chs, in_chs, stride, kernel=kernel, groups=in_chs, act=act),
            ConvBnAct(in_chs, out_chs, kernel=1, act=act),
        )


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> squeeze FC -> act -> expand FC -> sigmoid gates the channels."""

    def __init__(self, chs: int, squeeze_chs: int, act: bool | str = "silu"):
        super().__init__()
        self.fc1 = nn.Conv2d(chs, squeeze_chs, 1)
        self.act = make_act(act)
        self.fc2 = nn.Conv2d(squeeze_chs, chs, 1)

    def forward(self, x):
        # the global pool as a mean: adaptive_avg_pool2d(x, 1) computes the same mean, then reshapes
        # it through views whose backward (as_strided) costs more than the mean's (timm does the same)
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class InvertedResidual(nn.Module):
    """MobileNet v2's inverted residual, and with ``se_ratio`` EfficientNet's MBConv.

    1x1 expansion -> kxk depthwise -> (squeeze-excite) -> linear 1x1 projection; the skip joins
    the narrow ends, when stride is 1 and widths match. The projection has no activation because
    a ReLU on few channels destroys information. The SE squeeze width is ``se_ratio`` of the
    block's *input* channels, as in the EfficientNet reference.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, expansion: int = 6, kernel: int = 3,
                 act: bool | str = "relu6", se_ratio: float = 0.0):
        super().__init__()
        mid_chs = int(round(in_chs * expansion))
        layers = [ConvBnAct(in_chs, mid_chs, kernel=1, act=act)] if expansion != 1 else []
        layers.append(ConvBnAct(mid_chs, mid_chs, stride, kernel=kernel, groups=mid_chs, act=act))
        if se_ratio:
            layers.append(SqueezeExcite(mid_chs, max(1, int(in_chs * se_ratio)), act))
        layers.append(ConvBnAct(mid_chs, out_chs, kernel=1, act=False))
        self.branch = nn.Sequential(*layers)
        self.residual = stride == 1 and in_chs == out_chs
        self.drop_path = DropPath()  # present in every block so that the rates count every block

    def forward(self, x):
        z = self.branch(x)
        if self.residual:  # in place, as in ResidualBlock
            z = self.drop_path(z)
            z += x
        return z


BLOCKS: dict[str, type[nn.Module]] = {
    "conv_bn_act": ConvBnAct,
    "max_pool": MaxPool,
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
    "inception": Inception,
    "depthwise_separable": DepthwiseSeparable,
    "inverted_residual": InvertedResidual,
    "mbconv": InvertedResidual,  # EfficientNet's name; its yaml sets se_ratio and act
}
