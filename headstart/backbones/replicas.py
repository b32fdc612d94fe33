"""Exact Keras replicas of torch ImageNet models (MobileNetV2 from torchvision, EfficientNet-Lite0), and the
name map from each replica layer to the torch parameters that fill it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import keras

BASE_NAME = "base"  # with include_top, the convolutional base is nested under this name


def _conv_bn(
    x: keras.KerasTensor,
    name: str,
    filters: int,
    kernel: int,
    stride: int,
    *,
    depthwise: bool = False,
    epsilon: float,
    torch_padding: bool,
    activation: bool = True,
) -> keras.KerasTensor:
    """Conv (or depthwise conv) without bias, BatchNorm, optional ReLU6.

    torch pads a strided 3x3 conv by 1 on every side; Keras' 'same' pads (0, 1) there, so the
    replica pads explicitly and convolves 'valid'. Epsilon is fixed at construction: setting it
    on a built layer has no effect.
    """
    padding = "same"
    if torch_padding and stride > 1 and kernel > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    if depthwise:
        conv = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=f"{name}_conv")
    else:
        conv = keras.layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=f"{name}_conv")
    x = conv(x)
    x = keras.layers.BatchNormalization(epsilon=epsilon, momentum=0.9, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=f"{name}_relu")(x)
    return x


@dataclass(frozen=True)
class _Block:
    """An inverted-residual block: expand 1x1 (unless ratio 1), depthwise kxk, project 1x1."""

    index: int
    expand_ratio: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int


def _expand_blocks(settings: tuple[tuple[int, int, int, int, int, int], ...], first_index: int) -> list[_Block]:
    """settings rows: (expand_ratio, in_channels, out_channels, repeats, stride, kernel)."""
    blocks: list[_Block] = []
    for expand, in_channels, out_channels, repeats, stride, kernel in settings:
        for repeat in range(repeats):
            blocks.append(
                _Block(
                    first_index + len(blocks),
                    expand,
                    in_channels if repeat == 0 else out_channels,
                    out_channels,
                    kernel,
                    stride if repeat == 0 else 1,
                )
            )
    return blocks


def _inverted_residual_net(
    input_shape: tuple[int, int, int],
    include_top: bool,
    *,
    name: str,
    blocks: list[_Block],
    stem_channels: int,
    head_channels: int,
    epsilon: float,
    torch_padding: bool,
    dropout: float,
) -> keras.Model:
    """MobileNetV2 / EfficientNet-Lite body; with include_top, the base is nested as layer `base`."""
    conv = partial(_conv_bn, epsilon=epsilon, torch_padding=torch_padding)
    inputs = keras.Input(input_shape)
    x = conv(inputs, "stem", stem_channels, 3, 2)
    for block in blocks:
        prefix = f"block_{block.index}"
        shortcut = x
        if block.expand_ratio != 1:
            x = conv(x, f"{prefix}_expand", block.in_channels * block.expand_ratio, 1, 1)
        x = conv(x, f"{prefix}_dw", 0, block.kernel, block.stride, depthwise=True)
        x = conv(x, f"{prefix}_project", block.out_channels, 1, 1, activation=False)
        if block.stride == 1 and block.in_channels == block.out_channels:
            x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
    x = conv(x, "top", head_channels, 1, 1)
    base = keras.Model(inputs, x, name=BASE_NAME if include_top else name)
    if not include_top:
        return base
    inputs = keras.Input(input_shape)
    x = base(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(1000, name="logits")(x)
    return keras.Model(inputs, x, name=f"{name}_classifier")


# torchvision MobileNetV2: (t, c, n, s) rows rewritten as (expand, in, out, repeats, stride, kernel)
_TV_MOBILENET_V2 = _expand_blocks(
    (
        (1, 32, 16, 1, 1, 3),
        (6, 16, 24, 2, 2, 3),
        (6, 24, 32, 3, 2, 3),
        (6, 32, 64, 4, 2, 3),
        (6, 64, 96, 3, 1, 3),
        (6, 96, 160, 3, 2, 3),
        (6, 160, 320, 1, 1, 3),
    ),
    first_index=1,  # block_N is torchvision's features.N
)


def build_mobilenet_v2_tv(input_shape: tuple[int, int, int], weights: str | None, include_top: bool) -> keras.Model:
    return _inverted_residual_net(
        input_shape,
        include_top,
        name="mobilenet_v2_tv",
        blocks=_TV_MOBILENET_V2,
        stem_channels=32,
        head_channels=1280,
        epsilon=1e-5,
        torch_padding=True,
        dropout=0.2,
    )


def mobilenet_v2_tv_torch_names() -> dict[str, str]:
    names = {"stem_conv": "features.0.0", "stem_bn": "features.0.1"}
    for block in _TV_MOBILENET_V2:
        prefix, torch = f"block_{block.index}", f"features.{block.index}.conv"
        parts = ["dw", "project"] if block.expand_ratio == 1 else ["expand", "dw", "project"]
        for position, part in enumerate(parts[:-1]):
            names[f"{prefix}_{part}_conv"] = f"{torch}.{position}.0"
            names[f"{prefix}_{part}_bn"] = f"{torch}.{position}.1"
        names[f"{prefix}_project_conv"] = f"{torch}.{len(parts) - 1}"
        names[f"{prefix}_project_bn"] = f"{torch}.{len(parts)}"
    last = len(_TV_MOBILENET_V2) + 1
    names.update({"top_conv": f"features.{last}.0", "top_bn": f"features.{last}.1", "logits": "classifier.1"})
    return names


# EfficientNet-Lite0 (no squeeze-excite, ReLU6, TF 'same' padding, BN epsilon 1e-3); block_N is torch's _blocks.N
_EFFICIENTNET_LITE0 = _expand_blocks(
    (
        (1, 32, 16, 1, 1, 3),
        (6, 16, 24, 2, 2, 3),
        (6, 24, 40, 2, 2, 5),
        (6, 40, 80, 3, 2, 3),
        (6, 80, 112, 3, 1, 5),
        (6, 112, 192, 4, 2, 5),
        (6, 192, 320, 1, 1, 3),
    ),
    first_index=0,
)


def build_efficientnet_lite0(input_shape: tuple[int, int, int], weights: str | None, include_top: bool) -> keras.Model:
    return _inverted_residual_net(
        input_shape,
        include_top,
        name="efficientnet_lite0",
        blocks=_EFFICIENTNET_LITE0,
        stem_channels=32,
        head_channels=1280,
        epsilon=1e-3,
        torch_padding=False,  # converted from the TF checkpoint: its torch model pads like TF 'same'
        dropout=0.2,
    )


def efficientnet_lite0_torch_names() -> dict[str, str]:
    names = {"stem_conv": "_conv_stem", "stem_bn": "_bn0"}
    for block in _EFFICIENTNET_LITE0:
        prefix, torch = f"block_{block.index}", f"_blocks.{block.index}"
        if block.expand_ratio != 1:
            names.update({f"{prefix}_expand_conv": f"{torch}._expand_conv", f"{prefix}_expand_bn": f"{torch}._bn0"})
        names.update(
            {
                f"{prefix}_dw_conv": f"{torch}._depthwise_conv",
                f"{prefix}_dw_bn": f"{torch}._bn1",
                f"{prefix}_project_conv": f"{torch}._project_conv",
                f"{prefix}_project_bn": f"{torch}._bn2",
            }
        )
    names.update({"top_conv": "_conv_head", "top_bn": "_bn1", "logits": "_fc"})
    return names

