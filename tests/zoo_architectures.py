"""The ONNX model zoo's CNN architectures, built with torch.nn (torchvision does not import here).

Each builder returns a torch.nn.Module in eval mode with the layers, operators and connections of
the published network; `width` divides the channel counts (and `depth` shortens the stages of
the deep ones) so that tests stay quick while the structure stays. At width=1 (the default)
SqueezeNet 1.0/1.1 and ResNet-18 are the published networks, layer for layer (what
benchmarks/onnx_zoo_speed.py times). LRN is emitted as the ONNX LRN operator, as in the model
zoo's files (torch's own exporter decomposes LocalResponseNorm into Pad/AveragePool/If).

Used by tests/test_onnx_zoo.py and benchmarks/onnx_zoo_speed.py; importing it needs torch.
"""

from __future__ import annotations

import torch
from torch import nn


class _LRNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, size, alpha, beta, k):
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g, x, size, alpha, beta, k):
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    """torch.nn.LocalResponseNorm, exported as one ONNX LRN node."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0):
        super().__init__()
        self.args = (size, alpha, beta, k)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return _LRNFunction.apply(x, *self.args)
        return nn.functional.local_response_norm(x, *self.args)  # with autograd


def conv_bn(c_in, c_out, k, stride=1, padding=0, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(c_in, c_out, k, stride, padding, groups=groups, bias=False)]
    layers.append(nn.BatchNorm2d(c_out))
    return nn.Sequential(*layers, *([act()] if act else []))


def conv_relu(c_in, c_out, k, stride=1, padding=0):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, padding), nn.ReLU())


def _c(channels, width):
    return max(4, channels // width)


# -- SqueezeNet -----------------------------------------------------------------------------------


class Fire(nn.Module):
    def __init__(self, c_in, squeeze, expand):
        super().__init__()
        self.squeeze = conv_relu(c_in, squeeze, 1)
        self.expand1, self.expand3 = (
            conv_relu(squeeze, expand, 1),
            conv_relu(squeeze, expand, 3, 1, 1),
        )

    def forward(self, x):
        x = self.squeeze(x)
        return torch.cat([self.expand1(x), self.expand3(x)], 1)


def squeezenet(version="1.0", width=1, classes=1000):
    """1.0: 7x7 stem of 96, pools after fire 3 and 7; 1.1: 3x3 stem of 64, pools after 2 and 4."""
    c_stem, k, pools = (96, 7, (3, 7)) if version == "1.0" else (64, 3, (2, 4))
    layers = [conv_relu(3, _c(c_stem, width), k, 2), nn.MaxPool2d(3, 2, ceil_mode=True)]
    c_in = _c(c_stem, width)
    fires = [(16, 64), (16, 64), (32, 128), (32, 128), (48, 192), (48, 192), (64, 256), (64, 256)]
    for i, (squeeze, expand) in enumerate(fires, start=1):
        layers.append(Fire(c_in, _c(squeeze, width), _c(expand, width)))
        c_in = 2 * _c(expand, width)
        if i in pools:
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
    return nn.Sequential(
        *layers,
        nn.Dropout(0.5),
        nn.Conv2d(c_in, classes, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).eval()


# -- ResNet ---------------------------------------------------------------------------------------


class Residual(nn.Module):
    """ResNet's basic block (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4), projection shortcut."""

    def __init__(self, c_in, c, stride, bottleneck):
        super().__init__()
        c_out = 4 * c if bottleneck else c
        if bottleneck:
            self.body = nn.Sequential(
                conv_bn(c_in, c, 1), conv_bn(c, c, 3, stride, 1), conv_bn(c, c_out, 1, act=None)
            )
        else:
            self.body = nn.Sequential(
                conv_bn(c_in, c, 3, stride, 1), conv_bn(c, c, 3, 1, 1, act=None)
            )
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = conv_bn(c_in, c_out, 1, stride, act=None)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet(layers=(2, 2, 2, 2), bottleneck=False, width=1, classes=1000):
    base = _c(64, width)
    blocks, c_in = [], base
    for stage, count in enumerate(layers):
        c = base * 2**stage
        for i in range(count):
            blocks.append(Residual(c_in, c, 2 if i == 0 and stage > 0 else 1, bottleneck))
            c_in = 4 * c if bottleneck else c
    return nn.Sequential(
        conv_bn(3, base, 7, 2, 3),
        nn.MaxPool2d(3, 2, 1),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c_in, classes),
    ).eval()


# -- DenseNet -------------------------------------------------------------------------------------


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet121(width=1, depth=1, classes=1000):
    growth, c = _c(32, width), _c(64, width)
    layers = [
        nn.Conv2d(3, c, 7, 2, 3, bias=False),
        nn.BatchNorm2d(c),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    for i, count in enumerate((6, 12, 24, 16)):
        for _ in range(max(1, count // depth)):
            layers.append(DenseLayer(c, growth))
            c += growth
        if i < 3:  # transition: halve the channels and the size
            layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False)]
            layers.append(nn.AvgPool2d(2, 2))
            c //= 2
    layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(c, classes)).eval()


# -- Inception v1 (GoogLeNet) and v2 (BN-Inception) -----------------------------------------------


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 5x5 (v2: two 3x3); pool -> 1x1.
    v2 uses BatchNorm, average pooling in the pool branch, and a stride-2 form (no 1x1 branch,
    max pooling passed through)."""

    def __init__(self, c_in, c1, c3r, c3, c5r, c5, cp, v2=False, stride=1):
        super().__init__()
        unit = (lambda a, b, k, s=1, p=0: conv_bn(a, b, k, s, p)) if v2 else conv_relu
        self.b1 = unit(c_in, c1, 1) if c1 else None
        self.b3 = nn.Sequential(unit(c_in, c3r, 1), unit(c3r, c3, 3, stride, 1))
        if v2:
            self.b5 = nn.Sequential(
                unit(c_in, c5r, 1), unit(c5r, c5, 3, 1, 1), unit(c5, c5, 3, stride, 1)
            )
        else:
            self.b5 = nn.Sequential(unit(c_in, c5r, 1), unit(c5r, c5, 5, 1, 2))
        self.out_channels = c1 + c3 + c5 + (c_in if stride == 2 else cp)
        if stride == 2:
            self.pool = nn.MaxPool2d(3, 2, 1)
        elif v2:
            self.pool = nn.Sequential(
                nn.AvgPool2d(3, 1, 1, count_include_pad=True), unit(c_in, cp, 1)
            )
        else:
            self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), unit(c_in, cp, 1))

    def forward(self, x):
        branches = [self.b3(x), self.b5(x), self.pool(x)]
        return torch.cat(([self.b1(x)] if self.b1 is not None else []) + branches, 1)


def _inception(stem, modules, v2, width, classes):
    """The stem, then Inception modules (a tuple of channels, "pool" for a max pool between)."""
    layers, c_in = list(stem), _c(192, width)
    for spec in modules:
        if spec == "pool":
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
            continue
        *channels, stride = spec
        module = Inception(c_in, *(_c(v, width) if v else 0 for v in channels), v2, stride)
        layers.append(module)
        c_in = module.out_channels
    tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers, *tail).eval()


def inception_v1(width=1, classes=1000):
    """GoogLeNet: 7x7 stem, LRN, 3x3, LRN, Inception 3a, 3b, 4a, 4e, 5b (4b-4d: the same
    module as 4a; the auxiliary classifiers are training-only)."""
    c = lambda n: _c(n, width)  # noqa: E731
    stem = [
        conv_relu(3, c(64), 7, 2, 3),
        nn.MaxPool2d(3, 2, ceil_mode=True),
        LRN(5, 1e-4, 0.75),
        conv_relu(c(64), c(64), 1),
        conv_relu(c(64), c(192), 3, 1, 1),
        LRN(5, 1e-4, 0.75),
        nn.MaxPool2d(3, 2, ceil_mode=True),
    ]
    modules = [
        (64, 96, 128, 16, 32, 32, 1),
        (128, 128, 192, 32, 96, 64, 1),
        "pool",
        (192, 96, 208, 16, 48, 64, 1),
        (256, 160, 320, 32, 128, 128, 1),
        "pool",
        (384, 192, 384, 48, 128, 128, 1),
    ]
    return _inception(stem, modules, False, width, classes)


def inception_v2(width=1, classes=1000):
    """BN-Inception: BatchNorm after every conv, 5x5 as two 3x3, average-pool branches, and
    stride-2 modules (3c, 4e) that pass max pooling through."""
    c = lambda n: _c(n, width)  # noqa: E731
    stem = [
        conv_bn(3, c(64), 7, 2, 3),
        nn.MaxPool2d(3, 2, 1),
        conv_bn(c(64), c(64), 1),
        conv_bn(c(64), c(192), 3, 1, 1),
        nn.MaxPool2d(3, 2, 1),
    ]
    modules = [
        (64, 64, 64, 64, 96, 32, 1),  # 3a
        (0, 128, 160, 64, 96, 0, 2),  # 3c
        (224, 64, 96, 96, 128, 128, 1),  # 4a
        (0, 128, 192, 192, 256, 0, 2),  # 4e
        (352, 192, 320, 160, 224, 128, 1),  # 5a
    ]
    return _inception(stem, modules, True, width, classes)


# -- VGG, AlexNet, ZFNet --------------------------------------------------------------------------


def vgg19(width=1, classes=1000):
    layers, c_in = [], 3
    for stage, (c, n) in enumerate([(64, 2), (128, 2), (256, 4), (512, 4), (512, 4)]):
        for _ in range(n):
            layers.append(conv_relu(c_in, _c(c, width), 3, 1, 1))
            c_in = _c(c, width)
        layers.append(nn.MaxPool2d(2, 2))
    hidden = _c(4096, width)
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(c_in * 7 * 7, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, classes),
    ).eval()


def _lrn_net(first, second, width, classes):
    """AlexNet / ZFNet: two conv + ReLU + LRN + max pool stages, three 3x3 convs, three FC."""
    c = lambda n: _c(n, width)  # noqa: E731
    (k1, s1, p1), (k2, s2, p2) = first, second
    features = nn.Sequential(
        conv_relu(3, c(96), k1, s1, p1),
        LRN(5, 1e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        conv_relu(c(96), c(256), k2, s2, p2),
        LRN(5, 1e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        conv_relu(c(256), c(384), 3, 1, 1),
        conv_relu(c(384), c(384), 3, 1, 1),
        conv_relu(c(384), c(256), 3, 1, 1),
        nn.MaxPool2d(3, 2),
    )
    with torch.no_grad():
        flat = features(torch.zeros(1, 3, 224, 224)).numel()
    hidden = c(4096)
    return nn.Sequential(
        features,
        nn.Flatten(),
        nn.Dropout(),
        nn.Linear(flat, hidden),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, classes),
    ).eval()


def alexnet(width=1, classes=1000):
    return _lrn_net((11, 4, 2), (5, 1, 2), width, classes)


def zfnet(width=1, classes=1000):
    return _lrn_net((7, 2, 1), (5, 2, 0), width, classes)


# -- ShuffleNet v1 and v2, MobileNet v2 -----------------------------------------------------------


def channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1, channel shuffle, depthwise 3x3, grouped 1x1; stride 2: concat with an
    average-pooled shortcut."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        self.stride, self.groups = stride, groups
        mid = c_out // 4
        c_out = c_out - c_in if stride == 2 else c_out
        self.reduce = conv_bn(c_in, mid, 1, groups=groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, 1, groups=mid, act=None)
        self.expand = conv_bn(mid, c_out, 1, groups=groups, act=None)

    def forward(self, x):
        y = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.groups)))
        if self.stride == 2:
            return torch.relu(torch.cat([nn.functional.avg_pool2d(x, 3, 2, 1), y], 1))
        return torch.relu(x + y)


class ShuffleUnitV2(nn.Module):
    """Channel split (chunk), 1x1 - depthwise 3x3 - 1x1 on one half, concat, shuffle; stride 2:
    both halves are the whole input, one through a depthwise 3x3 - 1x1 branch."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.stride = stride
        half = c_out // 2
        branch_in = c_in if stride == 2 else c_in // 2
        self.branch = nn.Sequential(
            conv_bn(branch_in, half, 1),
            conv_bn(half, half, 3, stride, 1, groups=half, act=None),
            conv_bn(half, half, 1),
        )
        if stride == 2:
            self.shortcut = nn.Sequential(
                conv_bn(c_in, c_in, 3, 2, 1, groups=c_in, act=None), conv_bn(c_in, half, 1)
            )

    def forward(self, x):
        if self.stride == 2:
            out = torch.cat([self.shortcut(x), self.branch(x)], 1)
        else:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.branch(b)], 1)
        return channel_shuffle(out, 2)


def shufflenet(version=1, width=1, depth=1, classes=1000):
    stem = _c(24, width)
    if version == 1:
        widths, make = [240, 480, 960], lambda a, b, s: ShuffleUnitV1(a, b, s, 3)  # noqa: E731
    else:
        widths, make = [116, 232, 464], ShuffleUnitV2
    units, c_in = [], stem
    for c, repeat in zip(widths, (4, 8, 4)):
        c = max(12, c // width // 12 * 12)  # divisible by the groups and the halves
        for i in range(max(1, repeat // depth)):
            units.append(make(c_in, c, 2 if i == 0 else 1))
            c_in = c
    tail = [conv_bn(c_in, _c(1024, width), 1)] if version == 2 else []
    return nn.Sequential(
        conv_bn(3, stem, 3, 2, 1),
        nn.MaxPool2d(3, 2, 1),
        *units,
        *tail,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(_c(1024, width) if version == 2 else c_in, classes),
    ).eval()


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand):
        super().__init__()
        mid = c_in * expand
        layers = [conv_bn(c_in, mid, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(mid, mid, 3, stride, 1, groups=mid, act=nn.ReLU6)]
        self.body = nn.Sequential(*layers, conv_bn(mid, c_out, 1, act=None))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def mobilenet_v2(width=1, depth=1, classes=1000):
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
    settings += [(6, 160, 3, 2), (6, 320, 1, 1)]
    c_in, blocks = _c(32, width), []
    for t, c, n, s in settings:
        for i in range(max(1, n // depth)):
            blocks.append(InvertedResidual(c_in, _c(c, width), s if i == 0 else 1, t))
            c_in = _c(c, width)
    last = _c(1280, width)
    return nn.Sequential(
        conv_bn(3, _c(32, width), 3, 2, 1, act=nn.ReLU6),
        *blocks,
        conv_bn(c_in, last, 1, act=nn.ReLU6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(last, classes),
    ).eval()


def randomise_batchnorm(model, seed=0):
    """Non-trivial running statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model
