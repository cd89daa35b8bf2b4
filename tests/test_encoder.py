"""Expression encoder (SMIRK architecture in plain torch) and face crops."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hravatar.encoder import (
    EncoderConfig,
    ExpressionEncoder,
    MobileNetV3LargeMinimal,
    box_from_mask,
    crop_and_resize,
    crop_box_from_landmarks,
    encoder_state,
    load_encoder_state,
    load_smirk_weights,
    points_to_crop,
    smooth_boxes,
    split_encoder_outputs,
)
from hravatar.encoder.mobilenetv3 import Conv2dSame, create_conv_same, same_padding
from hravatar.io.safe import CheckpointError, load_safetensors_checked, save_safetensors_atomic

# timm's arch_def for MobileNetV3-Large "minimal" (timm/models/mobilenetv3.py), written out
# independently of hravatar's table and parsed here.
TIMM_LARGE_MINIMAL = [
    ["ds_r1_k3_s1_e1_c16"],
    ["ir_r1_k3_s2_e4_c24", "ir_r1_k3_s1_e3_c24"],
    ["ir_r3_k3_s2_e3_c40"],
    ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"],
    ["ir_r2_k3_s1_e6_c112"],
    ["ir_r3_k3_s2_e6_c160"],
    ["cn_r1_k1_s1_c960"],
]


def _parse(block: str) -> tuple[str, dict]:
    kind, *ops = block.split("_")
    return kind, {op[0]: float(op[1:]) for op in ops}


def _divisible8(v: float) -> int:
    # TF/timm channel rounding (nearest multiple of 8, never losing more than 10%)
    n = max(8, int(v + 4) // 8 * 8)
    return n + 8 if n < 0.9 * v else n


def _reference_param_count() -> int:
    """Learnable parameters of the features-only backbone, from the block formulas."""
    bn = lambda c: 2 * c  # noqa: E731  (weight + bias)
    total = 16 * 3 * 9 + bn(16)  # stem conv 3x3 s2 (no bias) + BN
    cin = 16
    for stage in TIMM_LARGE_MINIMAL:
        for block in stage:
            kind, o = _parse(block)
            cout, k = int(o["c"]), int(o["k"])
            for _ in range(int(o["r"])):
                if kind == "ds":
                    total += cin * k * k + bn(cin) + cin * cout + bn(cout)
                elif kind == "ir":
                    mid = _divisible8(cin * o["e"])
                    total += cin * mid + bn(mid) + mid * k * k + bn(mid) + mid * cout + bn(cout)
                else:
                    total += cin * cout * k * k + bn(cout)
                cin = cout
    return total


@pytest.fixture(scope="module")
def backbone() -> MobileNetV3LargeMinimal:
    torch.manual_seed(0)
    return MobileNetV3LargeMinimal().eval()


def _randomise_bn(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial BN statistics so that a load that forgot buffers would change outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.data.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))


# ----------------------------------------------------------------------------- backbone


def test_backbone_names_and_shapes_match_timm(backbone):
    sd = backbone.state_dict()
    expected = {
        "conv_stem.weight": (16, 3, 3, 3),
        "bn1.weight": (16,),
        "bn1.running_var": (16,),
        "bn1.num_batches_tracked": (),
        # first depthwise-separable block
        "blocks.0.0.conv_dw.weight": (16, 1, 3, 3),
        "blocks.0.0.bn1.bias": (16,),
        "blocks.0.0.conv_pw.weight": (16, 16, 1, 1),
        "blocks.0.0.bn2.running_mean": (16,),
        # inverted residuals with expansion (16*4 = 64; 80*2.3 -> 184; 160*6 = 960)
        "blocks.1.0.conv_pw.weight": (64, 16, 1, 1),
        "blocks.1.0.conv_dw.weight": (64, 1, 3, 3),
        "blocks.1.0.conv_pwl.weight": (24, 64, 1, 1),
        "blocks.1.0.bn3.weight": (24,),
        "blocks.3.2.conv_pw.weight": (184, 80, 1, 1),
        "blocks.4.1.bn2.running_var": (672,),
        "blocks.5.2.conv_pwl.weight": (160, 960, 1, 1),
        # final 1x1 conv to 960
        "blocks.6.0.conv.weight": (960, 160, 1, 1),
        "blocks.6.0.bn1.weight": (960,),
        "blocks.6.0.bn1.num_batches_tracked": (),
    }
    for k, shape in expected.items():
        assert k in sd, k
        assert tuple(sd[k].shape) == shape, k
    # no squeeze-excite, no classifier head, no conv biases (timm's create_conv2d)
    assert not any(".se." in k or k.startswith(("conv_head", "classifier")) for k in sd)
    assert all(k.rsplit(".", 2)[-2].startswith("bn") for k in sd if k.endswith(".bias"))
    n_blocks = {"ds": 0, "ir": 0, "cn": 0}
    for stage in TIMM_LARGE_MINIMAL:
        for b in stage:
            kind, o = _parse(b)
            n_blocks[kind] += int(o["r"])
    # conv weight + 5 BN entries per conv
    expected_keys = 6 + 12 * n_blocks["ds"] + 18 * n_blocks["ir"] + 6 * n_blocks["cn"]
    assert len(sd) == expected_keys
    assert [len(s) for s in backbone.blocks] == [sum(int(_parse(b)[1]["r"]) for b in st) for st in TIMM_LARGE_MINIMAL]


def test_backbone_parameter_count(backbone):
    n = sum(p.numel() for p in backbone.parameters())
    assert n == _reference_param_count()
    # timm's full classifier model adds conv_head (960->1280, bias) and a 1000-way classifier
    # and is published as 3.9M parameters
    full = n + 960 * 1280 + 1280 + 1280 * 1000 + 1000
    assert abs(full - 3.9e6) < 0.05e6


def test_bn_is_tf_flavoured(backbone):
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 for m in bns)


def _brute_conv(x, w, stride, pads):
    """Direct-sum convolution with explicit (top, bottom, left, right) zero padding (depthwise or dense)."""
    B, C, H, W = x.shape
    top, bottom, left, right = pads
    k = w.shape[-1]
    Ho = (H + top + bottom - k) // stride + 1
    Wo = (W + left + right - k) // stride + 1
    groups = C // w.shape[1]
    out = torch.zeros(B, w.shape[0], Ho, Wo, dtype=x.dtype)
    per_group = w.shape[0] // groups
    for oc in range(w.shape[0]):
        g = oc // per_group
        for oy in range(Ho):
            for ox in range(Wo):
                acc = torch.zeros(B, dtype=x.dtype)
                for ic in range(w.shape[1]):
                    for ky in range(k):
                        for kx in range(k):
                            iy, ix = oy * stride + ky - top, ox * stride + kx - left
                            if 0 <= iy < H and 0 <= ix < W:
                                acc += w[oc, ic, ky, kx] * x[:, g * w.shape[1] + ic, iy, ix]
                out[:, oc, oy, ox] = acc
    return out


@pytest.mark.parametrize("size", [(8, 9), (7, 6), (10, 11)])
def test_tf_same_padding_matches_brute_force(size):
    H, W = size
    torch.manual_seed(1)
    x = torch.randn(1, 2, H, W, dtype=torch.float64)
    # TensorFlow SAME for k=3, s=2: odd sizes pad (1, 1), even sizes pad (0, 1): the extra
    # pixel goes at the bottom/right, unlike PyTorch's symmetric padding
    tf_pad = lambda n: (1, 1) if n % 2 else (0, 1)  # noqa: E731
    for groups in (1, 2):
        conv = create_conv_same(2, 2, 3, stride=2, groups=groups).double()
        assert isinstance(conv, Conv2dSame)
        ref = _brute_conv(x, conv.weight.detach(), 2, (*tf_pad(H), *tf_pad(W)))
        got = conv(x).detach()
        assert got.shape[-2:] == (math.ceil(H / 2), math.ceil(W / 2))
        assert torch.allclose(got, ref, atol=1e-12)
    # stride 1: symmetric padding 1, a plain static conv
    conv1 = create_conv_same(2, 3, 3, stride=1).double()
    assert not isinstance(conv1, Conv2dSame)
    assert torch.allclose(conv1(x).detach(), _brute_conv(x, conv1.weight.detach(), 1, (1, 1, 1, 1)), atol=1e-12)
    assert same_padding(224, 3, 2) == (0, 1) and same_padding(7, 3, 2) == (1, 1) and same_padding(5, 1, 1) == (0, 0)


def test_feature_maps_shapes_odd_input(backbone):
    x = torch.rand(1, 3, 65, 49)
    with torch.no_grad():
        feats = backbone.forward_features(x)
    chans = [f.shape[1] for f in feats]
    assert chans == [16, 24, 40, 112, 960] == [d["num_chs"] for d in backbone.feature_info]
    # TF "SAME" rounds every stride-2 stage up: 65 -> 33 -> 17 -> 9 -> 5 -> 3
    for f, red in zip(feats, (2, 4, 8, 16, 32)):
        assert f.shape[-2:] == (math.ceil(65 / red), math.ceil(49 / red))


# ----------------------------------------------------------------------------- encoder


def test_forward_shapes_and_clamps():
    torch.manual_seed(2)
    enc = ExpressionEncoder().eval()
    img = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = enc(img)
        pooled = F.adaptive_avg_pool2d(enc.encoder(img)[-1], 1).flatten(1)
    assert out["expr"].shape == (2, 50) and out["eyelids"].shape == (2, 2) and out["jaw"].shape == (2, 3)
    raw = enc.expression_layers(pooled)
    assert torch.allclose(out["expr"], raw[:, :50], atol=1e-5)
    # drive the head to extreme values through the real forward
    lin = enc.expression_layers[0]
    extreme = torch.tensor([7.0] * 50 + [3.0, -2.0] + [-5.0, 9.0, -9.0])
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(extreme)
        out = enc(img)
    assert torch.equal(out["expr"], extreme[:50].expand(2, 50))
    assert torch.equal(out["eyelids"], torch.tensor([[1.0, 0.0]] * 2))
    assert torch.equal(out["jaw"], torch.tensor([[0.0, 0.2, -0.2]] * 2))
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([0.0] * 50 + [0.3, 0.7] + [0.25, 0.1, -0.15]))
        out = enc(img)
    assert torch.allclose(out["eyelids"], torch.tensor([[0.3, 0.7]] * 2))
    assert torch.allclose(out["jaw"], torch.tensor([[0.25, 0.1, -0.15]] * 2))


def test_split_outputs_elementwise():
    raw = torch.linspace(-3, 3, 4 * 15).reshape(4, 15)
    o = split_encoder_outputs(raw, 10, jaw_side_limit=0.5)
    for b in range(4):
        r = raw[b].tolist()
        assert o["expr"][b].tolist() == r[:10]
        assert o["eyelids"][b].tolist() == [min(max(v, 0.0), 1.0) for v in r[10:12]]
        assert o["jaw"][b].tolist() == [max(r[12], 0.0)] + [min(max(v, -0.5), 0.5) for v in r[13:15]]


def test_head_init_is_scaled_default_linear():
    torch.manual_seed(3)
    enc = ExpressionEncoder()
    w, b = enc.expression_layers[0].weight.detach(), enc.expression_layers[0].bias.detach()
    # nn.Linear default: U(-1/sqrt(960), 1/sqrt(960)); SMIRK multiplies by 0.1
    bound = 0.1 / math.sqrt(960)
    assert w.shape == (55, 960) and b.shape == (55,)
    assert w.abs().max() <= bound and b.abs().max() <= bound
    assert w.abs().max() > 0.99 * bound  # 52800 uniform draws reach the edge
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.02 * bound
    assert abs(w.mean().item()) < 0.01 * bound
    enc2 = ExpressionEncoder(EncoderConfig(init_scale=1.0))
    assert enc2.expression_layers[0].weight.abs().max() > 0.99 / math.sqrt(960)


def test_freeze_bn_keeps_running_stats():
    enc = ExpressionEncoder(EncoderConfig(freeze_bn=True)).train()
    before = enc.encoder.bn1.running_mean.clone()
    enc(torch.rand(2, 3, 64, 64))
    assert torch.equal(enc.encoder.bn1.running_mean, before)
    assert enc.training and not enc.encoder.bn1.training
    enc_free = ExpressionEncoder().train()
    enc_free(torch.rand(2, 3, 64, 64))
    assert not torch.equal(enc_free.encoder.bn1.running_mean, torch.zeros(16))


# ----------------------------------------------------------------------------- checkpoints


def _smirk_file(tmp_path: Path, enc: ExpressionEncoder, nest: str | None = None, drop: str | None = None) -> Path:
    sd = {f"smirk_encoder.expression_encoder.{k}": v for k, v in enc.state_dict().items()}
    # other networks of a SMIRK checkpoint must be ignored (the pose encoder also has "encoder.*")
    sd["smirk_encoder.pose_encoder.encoder.conv_stem.weight"] = torch.randn(16, 3, 3, 3)
    sd["smirk_generator.encoder.0.weight"] = torch.randn(4, 3)
    if drop:
        del sd[drop]
    obj = {nest: sd} if nest else sd
    path = tmp_path / "SMIRK_em1.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("nest", [None, "state_dict"])
def test_smirk_weights_roundtrip(tmp_path, nest):
    torch.manual_seed(4)
    src = ExpressionEncoder(EncoderConfig(init_scale=5.0))
    _randomise_bn(src, 0)
    path = _smirk_file(tmp_path, src, nest)
    dst = ExpressionEncoder()
    res = load_smirk_weights(dst, path)
    assert res.head_loaded and res.backbone_tensors == len(src.encoder.state_dict())
    img = torch.rand(1, 3, 224, 224)
    src.eval(), dst.eval()
    with torch.no_grad():
        a, b = src(img), dst(img)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert a["expr"].abs().max() > 1e-3  # the comparison is not between two zero outputs


def test_smirk_weights_other_n_expr_keeps_backbone(tmp_path):
    torch.manual_seed(5)
    src = ExpressionEncoder()
    _randomise_bn(src, 1)
    path = _smirk_file(tmp_path, src)
    dst = ExpressionEncoder(EncoderConfig(n_expr=20)).eval()
    res = load_smirk_weights(dst, path)
    assert not res.head_loaded
    img = torch.rand(1, 3, 64, 64)
    src.eval()
    with torch.no_grad():
        assert torch.equal(src.features(img), dst.features(img))
        out = dst(img)
    assert out["expr"].shape == (1, 20)
    assert dst.expression_layers[0].weight.shape == (25, 960)
    assert dst.expression_layers[0].weight.abs().max() <= 0.1 / math.sqrt(960)


def test_smirk_missing_key_is_one_line_error(tmp_path):
    src = ExpressionEncoder()
    path = _smirk_file(tmp_path, src, drop="smirk_encoder.expression_encoder.encoder.blocks.3.1.conv_dw.weight")
    with pytest.raises(CheckpointError) as ei:
        load_smirk_weights(ExpressionEncoder(), path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg and "missing" in msg and "blocks.3.1.conv_dw.weight" in msg

    with pytest.raises(CheckpointError) as ei:
        load_smirk_weights(ExpressionEncoder(), tmp_path / "nope.pt")
    assert "\n" not in str(ei.value) and "nope.pt" in str(ei.value) and "not found" in str(ei.value)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError) as ei:
        load_smirk_weights(ExpressionEncoder(), junk)
    assert "\n" not in str(ei.value) and "junk.pt" in str(ei.value)

    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(CheckpointError, match="not a SMIRK checkpoint"):
        load_smirk_weights(ExpressionEncoder(), other)


class _Payload:
    """Unpickling this object would create a file: a stand-in for malicious pickle code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_smirk_loader_refuses_arbitrary_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"smirk_encoder.expression_encoder.encoder.x": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as ei:
        load_smirk_weights(ExpressionEncoder(), path)
    assert "evil.pt" in str(ei.value) and "refused" in str(ei.value) and "\n" not in str(ei.value)
    assert not marker.exists()


def test_encoder_state_safetensors_roundtrip(tmp_path):
    torch.manual_seed(6)
    src = ExpressionEncoder(EncoderConfig(init_scale=3.0))
    _randomise_bn(src, 2)
    tensors = encoder_state(src, prefix="extra.encoder.")
    tensors["avatar.means"] = torch.randn(10, 3)  # other components share the file
    path = tmp_path / "ckpt.safetensors"
    save_safetensors_atomic(tensors, path)
    loaded, _ = load_safetensors_checked(path)
    dst = ExpressionEncoder()
    load_encoder_state(dst, loaded, prefix="extra.encoder.", source=str(path))
    img = torch.rand(1, 3, 96, 96)
    src.eval(), dst.eval()
    with torch.no_grad():
        a, b = src(img), dst(img)
    assert all(torch.equal(a[k], b[k]) for k in a)

    del loaded["extra.encoder.encoder.blocks.6.0.conv.weight"]
    with pytest.raises(CheckpointError) as ei:
        load_encoder_state(ExpressionEncoder(), loaded, prefix="extra.encoder.", source=str(path))
    assert str(path) in str(ei.value) and "missing" in str(ei.value) and "\n" not in str(ei.value)


# ----------------------------------------------------------------------------- crops


def test_landmark_box_scale():
    g = torch.Generator().manual_seed(7)
    x0, y0, x1, y1 = 40.0, 60.0, 140.0, 200.0
    inner = torch.rand(2, 30, 2, generator=g) * torch.tensor([x1 - x0, y1 - y0]) + torch.tensor([x0, y0])
    corners = torch.tensor([[x0, y1], [x1, y0]]).expand(2, 2, 2)
    lmk = torch.cat([inner, corners], 1)
    box = crop_box_from_landmarks(lmk, scale=1.4)
    side = ((x1 - x0) + (y1 - y0)) / 2
    assert torch.allclose(box, torch.tensor([[90.0, 130.0, 1.4 * side]] * 2))
    # the box scales about the landmark-box centre
    box1 = crop_box_from_landmarks(lmk, scale=1.0)
    assert torch.allclose(box[:, :2], box1[:, :2]) and torch.allclose(box[:, 2], 1.4 * box1[:, 2])


def test_box_from_mask():
    m = torch.zeros(2, 1, 40, 60)
    m[0, 0, 10:30, 5:45] = 1.0  # rows 10..29, columns 5..44
    box = box_from_mask(m, scale=1.2)
    assert torch.allclose(box[0], torch.tensor([25.0, 20.0, 1.2 * (40 + 20) / 2]))
    assert torch.allclose(box[1], torch.tensor([30.0, 20.0, 60.0]))  # empty mask: whole image


def test_crop_identity_and_linear_ramp():
    H = W = 16
    img = torch.rand(1, 3, H, W, dtype=torch.float64)
    # box = the whole image at the same resolution samples exactly at the pixel centres
    same = crop_and_resize(img, torch.tensor([[W / 2, H / 2, float(W)]], dtype=torch.float64), out=W)
    assert torch.allclose(same, img, atol=1e-12)
    # bilinear reproduces a linear ramp exactly: channel 0 = x, channel 1 = y of pixel centres
    ys, xs = torch.meshgrid(torch.arange(48.0) + 0.5, torch.arange(64.0) + 0.5, indexing="ij")
    ramp = torch.stack([xs, ys])[None].double()
    cx, cy, s, out = 30.3, 22.7, 20.0, 10
    crop = crop_and_resize(ramp, torch.tensor([[cx, cy, s]], dtype=torch.float64), out=out)
    t = (torch.arange(out, dtype=torch.float64) + 0.5) / out - 0.5
    assert torch.allclose(crop[0, 0], (cx + t * s)[None].expand(out, out), atol=1e-9)
    assert torch.allclose(crop[0, 1], (cy + t * s)[:, None].expand(out, out), atol=1e-9)
    # the box centre lands at the crop centre (between the 4 middle pixels for an even side)
    mid = crop[0, :, out // 2 - 1 : out // 2 + 1, out // 2 - 1 : out // 2 + 1].mean((1, 2))
    assert torch.allclose(mid, torch.tensor([cx, cy], dtype=torch.float64), atol=1e-9)


def test_crop_blob_centre_and_points():
    H, W = 80, 100
    ys, xs = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    cx, cy = 61.3, 33.8
    blob = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * 3.0**2))
    img = blob.expand(1, 3, H, W).double()
    box = torch.tensor([[cx - 4.2, cy + 2.9, 36.0]], dtype=torch.float64)
    out = 48
    crop = crop_and_resize(img, box, out=out)[0, 0]
    cys, cxs = torch.meshgrid(torch.arange(out) + 0.5, torch.arange(out) + 0.5, indexing="ij")
    centroid = torch.stack([(crop * cxs).sum(), (crop * cys).sum()]) / crop.sum()
    expect = points_to_crop(torch.tensor([[[cx, cy]]], dtype=torch.float64), box, out)[0, 0]
    assert torch.allclose(centroid, expect, atol=0.05)
    # and with the box centred on the blob, at the crop centre
    crop_c = crop_and_resize(img, torch.tensor([[cx, cy, 30.0]], dtype=torch.float64), out=out)[0, 0]
    cen = torch.stack([(crop_c * cxs).sum(), (crop_c * cys).sum()]) / crop_c.sum()
    assert torch.allclose(cen, torch.tensor([out / 2, out / 2], dtype=torch.float64), atol=0.05)


def test_crop_is_differentiable():
    img = torch.rand(2, 3, 9, 11, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[5.1, 4.3, 6.0], [4.0, 5.5, 12.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda im: crop_and_resize(im, boxes, out=5), (img,))
    # pixels far outside the box get no gradient
    img2 = torch.rand(1, 1, 20, 20, requires_grad=True)
    crop_and_resize(img2, torch.tensor([[5.0, 5.0, 4.0]]), out=4).sum().backward()
    assert img2.grad[0, 0, 10:, :].abs().sum() == 0 and img2.grad[0, 0, 3:7, 3:7].abs().sum() > 0


def _smooth_reference(boxes: torch.Tensor, window: int) -> torch.Tensor:
    T, r = boxes.shape[0], window // 2
    valid = [bool(torch.isfinite(boxes[t]).all()) for t in range(T)]
    out = [None] * T
    for t in range(T):
        idx = [u for u in range(max(0, t - r), min(T, t + r + 1)) if valid[u]]
        if idx:
            out[t] = boxes[idx].mean(0)
    have = [t for t in range(T) if out[t] is not None]
    for t in range(T):
        if out[t] is None:
            out[t] = out[min(have, key=lambda u: (abs(u - t), u))]
    return torch.stack(out)


def test_smooth_boxes():
    g = torch.Generator().manual_seed(8)
    T = 23
    boxes = torch.rand(T, 4, generator=g, dtype=torch.float64) * 100
    boxes[5] = float("nan")
    boxes[12:19] = float("nan")  # a gap longer than the window
    for window in (1, 3, 5):
        assert torch.allclose(smooth_boxes(boxes, window), _smooth_reference(boxes, window), atol=1e-12)
    # a linear trajectory is unchanged away from the ends
    lin = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor([1.0, -2.0, 0.5, 0.1]) + 50
    sm = smooth_boxes(lin, 5)
    assert torch.allclose(sm[2:-2], lin[2:-2], atol=1e-12)
    with pytest.raises(ValueError):
        smooth_boxes(lin, 4)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encoder_and_crop_on_gpu():
    torch.manual_seed(9)
    enc = ExpressionEncoder().eval()
    img = torch.rand(2, 3, 300, 280)
    boxes = torch.tensor([[140.0, 150.0, 200.0], [120.0, 160.0, 180.0]])
    # cuDNN's default TF32 convolutions round to 10 mantissa bits (1e-3 relative on outputs of ~10):
    # compare full float32 arithmetic
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ref = enc(crop_and_resize(img, boxes))
        got = enc.cuda()(crop_and_resize(img.cuda(), boxes.cuda()))
    for k in ref:
        assert got[k].device.type == "cuda"
        assert torch.allclose(got[k].cpu(), ref[k], atol=1e-3, rtol=1e-3), k


def test_output_regression_loss_through_the_clamps():
    from hravatar.encoder import output_regression_loss

    E = 3
    # expr, eyelids (0..1), jaw (open >= 0, sides +-0.2)
    target = torch.tensor([[0.5, -0.2, 0.0, 0.0, 1.0, 0.1, 0.2, -0.05]])
    raw = torch.tensor([[0.7, -0.2, 0.3, -0.4, 1.5, -1.0, 0.1, -0.05]], requires_grad=True)
    loss = output_regression_loss(raw, target, jaw_side_limit=0.2)
    # by hand: expr errors 0.2, 0, 0.3; eyelid target 0 with raw -0.4: 0 (clamps to 0 too);
    # eyelid target 1 with raw 1.5: 0; jaw open target 0.1 from a "dead" raw -1: 1.1;
    # jaw side target at the bound 0.2 with raw 0.1 inside: 0.1; last side: 0
    expect = (0.2 ** 2 + 0.3 ** 2 + 1.1 ** 2 + 0.1 ** 2) / 8
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    loss.backward()
    assert raw.grad[0, E + 2] < 0  # the dead jaw unit is pushed back up (the clamped output has no gradient there)
    assert raw.grad[0, E + 1] == 0 and raw.grad[0, E] == 0
    # consistent with the clamped outputs: a zero loss means the processed outputs equal the target
    out = split_encoder_outputs(target.clone(), E)
    assert output_regression_loss(out["raw"], target).item() == 0
