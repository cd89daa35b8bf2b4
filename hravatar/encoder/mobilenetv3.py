"""MobileNetV3-Large "minimal" feature extractor in plain torch (timm-compatible state dict).

This reproduces timm's ``tf_mobilenetv3_large_minimal_100`` created with ``features_only=True``
(class ``MobileNetV3Features``): the module tree, and so every parameter / buffer name and
shape, is the same, so SMIRK's expression-encoder weights load with strict matching.

"Minimal" MobileNetV3: no squeeze-excite, ReLU everywhere (no hard-swish), 3x3 depthwise
kernels only. The TF-port variant ("tf_") differs from the PyTorch-native one by
TensorFlow "SAME" padding (asymmetric and input-size dependent for stride-2 convolutions)
and BatchNorm eps=1e-3. timm leaves the BatchNorm momentum at PyTorch's default (0.1) for
this model, so we do too (it only matters while training).

State-dict layout (B = nn.BatchNorm2d with weight/bias/running_mean/running_var/num_batches_tracked):
    conv_stem.weight [16,3,3,3]; bn1 (16)
    blocks.0.0  depthwise-separable: conv_dw [16,1,3,3], bn1, conv_pw [16,16,1,1], bn2
    blocks.{1..5}.{j} inverted residual: conv_pw [mid,in,1,1], bn1, conv_dw [mid,1,3,3], bn2,
                                         conv_pwl [out,mid,1,1], bn3
    blocks.6.0  conv-bn-act: conv [960,160,1,1], bn1
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

#: TensorFlow's BatchNorm epsilon used by the TF-ported weights.
BN_EPS_TF = 1e-3

#: Architecture of MobileNetV3-Large-minimal at width 1.0, one tuple per stage and one
#: entry per block: (block type, depthwise kernel, stride, expansion ratio, out channels).
#: "ds" = depthwise-separable, "ir" = inverted residual, "cn" = conv + BN + ReLU.
#: Equivalent to timm's arch_def strings (e.g. 'ir_r3_k3_s2_e3_c40' = three "ir" rows).
LARGE_MINIMAL_ARCH: tuple[tuple[tuple[str, int, int, float, int], ...], ...] = (
    (("ds", 3, 1, 1.0, 16),),
    (("ir", 3, 2, 4.0, 24), ("ir", 3, 1, 3.0, 24)),
    (("ir", 3, 2, 3.0, 40), ("ir", 3, 1, 3.0, 40), ("ir", 3, 1, 3.0, 40)),
    (("ir", 3, 2, 6.0, 80), ("ir", 3, 1, 2.5, 80), ("ir", 3, 1, 2.3, 80), ("ir", 3, 1, 2.3, 80)),
    (("ir", 3, 1, 6.0, 112), ("ir", 3, 1, 6.0, 112)),
    (("ir", 3, 2, 6.0, 160), ("ir", 3, 1, 6.0, 160), ("ir", 3, 1, 6.0, 160)),
    (("cn", 1, 1, 1.0, 960),),
)
STEM_CHANNELS = 16


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of ``divisor`` as timm/TF do.

    Rounds to the nearest multiple, never below ``divisor``, and bumps up by one multiple when
    rounding lost more than ``1 - round_limit`` of the value (the expansion widths depend on it).
    """
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow "SAME" padding along one axis.

    The output has ``ceil(size / stride)`` samples; the total padding needed for that is split
    with the smaller half first (TF puts the extra pixel at the bottom/right).

    Args:
        size: input length (pixels).
        kernel, stride, dilation: convolution geometry.
    Returns:
        (pad_before, pad_after) in pixels.
    """
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def pad_same(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Tensor:
    """Zero-pad ``x`` [B, C, H, W] for a TF "SAME" convolution; returns [B, C, H', W']."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0], dilation[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1], dilation[1])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom))


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TF "SAME" padding computed from the input size at every call.

    Only used where the padding cannot be static (stride > 1), as timm does; parameter names
    are those of ``nn.Conv2d``. Input [B, Cin, H, W] -> output [B, Cout, ceil(H/s), ceil(W/s)].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1, groups: int = 1, bias: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: Tensor) -> Tensor:
        x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def create_conv_same(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution with TF "SAME" semantics.

    Stride 1 with an odd kernel pads symmetrically, so a plain ``nn.Conv2d`` with static padding
    is exact and cheaper; otherwise a :class:`Conv2dSame` pads per call.
    """
    if stride == 1 and (kernel_size - 1) % 2 == 0:
        return nn.Conv2d(in_channels, out_channels, kernel_size, 1, (kernel_size - 1) // 2, groups=groups, bias=False)
    return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=False)


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS_TF, momentum=momentum)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN (no activation), residual when shapes allow.

    x [B, Cin, H, W] -> [B, Cout, H/s, W/s].
    """

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_dw = create_conv_same(in_chs, in_chs, kernel, stride, groups=in_chs)
        self.bn1 = _bn(in_chs, bn_momentum)
        self.conv_pw = create_conv_same(in_chs, out_chs, 1)
        self.bn2 = _bn(out_chs, bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv_dw(x)))
        y = self.bn2(self.conv_pw(y))
        return y + x if self.has_skip else y


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 inverted residual: 1x1 expand + BN + ReLU, 3x3 depthwise + BN + ReLU,
    1x1 linear projection + BN, residual when stride 1 and channels match.

    x [B, Cin, H, W] -> [B, Cout, H/s, W/s]; the hidden width is
    ``make_divisible(Cin * exp_ratio)``.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, exp_ratio: float, bn_momentum: float = 0.1):
        super().__init__()
        mid = make_divisible(in_chs * exp_ratio)
        self.has_skip = stride == 1 and in_chs == out_chs
        self.conv_pw = create_conv_same(in_chs, mid, 1)
        self.bn1 = _bn(mid, bn_momentum)
        self.conv_dw = create_conv_same(mid, mid, kernel, stride, groups=mid)
        self.bn2 = _bn(mid, bn_momentum)
        self.conv_pwl = create_conv_same(mid, out_chs, 1)
        self.bn3 = _bn(out_chs, bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv_pw(x)))
        y = F.relu(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return y + x if self.has_skip else y


class ConvBnAct(nn.Module):
    """Convolution + BN + ReLU (the last 1x1 conv to 960 channels). x [B,Cin,H,W] -> [B,Cout,H/s,W/s]."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, bn_momentum: float = 0.1):
        super().__init__()
        self.conv = create_conv_same(in_chs, out_chs, kernel, stride)
        self.bn1 = _bn(out_chs, bn_momentum)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv(x)))


def init_weights_tf(module: nn.Module) -> None:
    """In-place initialisation as timm's ``_init_weight_goog`` (TF reference implementations).

    Convolutions: normal(0, sqrt(2 / fan_out)) with fan_out = k*k*out/groups; BatchNorm: weight
    1, bias 0 (running statistics keep their defaults).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MobileNetV3LargeMinimal(nn.Module):
    """timm ``tf_mobilenetv3_large_minimal_100`` with ``features_only=True``, in plain torch.

    Args:
        in_chans: input channels (3 for RGB).
        bn_momentum: BatchNorm momentum (PyTorch convention; timm uses the default 0.1).

    Attributes:
        feature_info: one dict per returned feature map with ``num_chs`` and ``reduction``:
            channels (16, 24, 40, 112, 960) at strides (2, 4, 8, 16, 32).
        num_features: channels of the last feature map (960).
    """

    def __init__(self, in_chans: int = 3, bn_momentum: float = 0.1):
        super().__init__()
        self.conv_stem = create_conv_same(in_chans, STEM_CHANNELS, 3, stride=2)
        self.bn1 = _bn(STEM_CHANNELS, bn_momentum)
        stages: list[nn.Sequential] = []
        in_chs, stride_total = STEM_CHANNELS, 2
        self.feature_info: list[dict[str, int]] = []
        self._feature_stages: list[int] = []
        for si, stage in enumerate(LARGE_MINIMAL_ARCH):
            blocks: list[nn.Module] = []
            for kind, k, s, e, out in stage:
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out, k, s, bn_momentum))
                elif kind == "ir":
                    blocks.append(InvertedResidual(in_chs, out, k, s, e, bn_momentum))
                else:
                    blocks.append(ConvBnAct(in_chs, out, k, s, bn_momentum))
                in_chs, stride_total = out, stride_total * s
            stages.append(nn.Sequential(*blocks))
            # timm (feature_location="bottleneck") taps the end of a stage when the next
            # stage starts with a stride, and always the last stage
            last = si + 1 == len(LARGE_MINIMAL_ARCH)
            if last or LARGE_MINIMAL_ARCH[si + 1][0][2] > 1:
                self.feature_info.append({"num_chs": in_chs, "reduction": stride_total, "stage": si})
                self._feature_stages.append(si)
        self.blocks = nn.Sequential(*stages)
        self.num_features = in_chs
        init_weights_tf(self)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Feature maps at the stage ends (timm ``features_only`` semantics).

        Args:
            x: [B, 3, H, W] images (SMIRK: 224x224 RGB in [0, 1], no normalisation).
        Returns:
            5 tensors: [B, 16, H/2, W/2], [B, 24, H/4, W/4], [B, 40, H/8, W/8],
            [B, 112, H/16, W/16], [B, 960, H/32, W/32] (sizes rounded up, TF "SAME").
        """
        x = F.relu(self.bn1(self.conv_stem(x)))
        feats: list[Tensor] = []
        for si, stage in enumerate(self.blocks):
            x = stage(x)
            if si in self._feature_stages:
                feats.append(x)
        return feats

    def forward(self, x: Tensor) -> list[Tensor]:
        """Same as :meth:`forward_features` (timm's features-only modules return the list)."""
        return self.forward_features(x)
