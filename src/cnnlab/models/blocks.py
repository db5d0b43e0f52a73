"""Building blocks shared by every architecture.

Every block has the signature ``Block(in_chs, out_chs, stride=1, **options)`` so that the
builder can stack any of them from a stage table. ``BLOCKS`` is the one registry that maps
the names used in ``conf/model/*.yaml`` to these classes.
"""

from __future__ import annotations

from torch import nn


class ConvBnAct(nn.Sequential):
    """conv -> BatchNorm -> activation, with "same" padding for odd kernels."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, kernel: int = 3,
                 groups: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True) if act else nn.Identity(),
        )


class MaxPool(nn.MaxPool2d):
    """Max pooling as a block; channels pass through unchanged."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, kernel: int = 3):
        if in_chs != out_chs:
            raise ValueError(f"max_pool keeps channels: got in_chs={in_chs}, out_chs={out_chs}")
        super().__init__(kernel, stride, padding=kernel // 2)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a skip connection: a[l+2] = g(z[l+2] + a[l]).

    The shortcut is the identity when shapes match and a strided 1x1 projection otherwise.
    ``residual=False`` drops the skip to give the "plain" twin of the same depth.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, residual: bool = True):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs, out_chs, stride)
        self.conv2 = ConvBnAct(out_chs, out_chs, act=False)
        self.residual = residual
        needs_projection = residual and (stride != 1 or in_chs != out_chs)
        self.shortcut = ConvBnAct(in_chs, out_chs, stride, kernel=1, act=False) if needs_projection else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        z = self.conv2(self.conv1(x))
        if self.residual:
            z = z + self.shortcut(x)
        return self.act(z)


BLOCKS: dict[str, type[nn.Module]] = {
    "conv_bn_act": ConvBnAct,
    "max_pool": MaxPool,
    "basic": BasicBlock,
}
