"""Reading and writing HDR environment maps (lat-long, linear radiance).

Supported: Radiance ``.hdr`` (RGBE, flat or run-length encoded scanlines; own numpy reader and
writer), OpenEXR ``.exr`` (``OpenEXR`` 3.x package; any compression incl. half-float DWAB),
``.npy`` float arrays and ``.png``/``.jpg`` as an LDR fallback (sRGB decoded to linear).
Expected user errors raise :class:`EnvmapError` with a one-line message naming the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SUPPORTED_SUFFIXES = (".hdr", ".exr", ".npy", ".png", ".jpg", ".jpeg")


class EnvmapError(ValueError):
    """An environment map file is missing, unreadable or not a usable lat-long HDR (one line)."""


# --------------------------------------------------------------------------- Radiance RGBE
def rgbe_to_float(rgbe: np.ndarray) -> np.ndarray:
    """Decode RGBE pixels (Radiance convention: mantissa + 0.5, exponent bias 128 + 8).

    Args:
        rgbe: [..., 4] uint8.
    Returns:
        [..., 3] float32 (exponent byte 0 decodes to black).
    """
    e = rgbe[..., 3].astype(np.int32)
    scale = np.where(e > 0, np.ldexp(np.float32(1.0), e - 136), 0.0).astype(np.float32)
    return (rgbe[..., :3].astype(np.float32) + 0.5) * scale[..., None]


def float_to_rgbe(rgb: np.ndarray) -> np.ndarray:
    """Encode non-negative RGB as RGBE (shared exponent of the largest component).

    Args:
        rgb: [..., 3] float (negatives are clamped to 0).
    Returns:
        [..., 4] uint8.
    """
    rgb = np.maximum(np.asarray(rgb, dtype=np.float64), 0.0)
    m = rgb.max(-1)
    frac, exp = np.frexp(m)  # m = frac * 2^exp, frac in [0.5, 1)
    ok = m > 1e-32
    scale = np.where(ok, frac * 256.0 / np.where(ok, m, 1.0), 0.0)
    mant = np.clip(np.floor(rgb * scale[..., None]), 0, 255)
    out = np.zeros(rgb.shape[:-1] + (4,), dtype=np.uint8)
    out[..., :3] = np.where(ok[..., None], mant, 0).astype(np.uint8)
    out[..., 3] = np.where(ok, np.clip(exp + 128, 0, 255), 0).astype(np.uint8)
    return out


def _parse_hdr_header(data: bytes, path: Path) -> tuple[int, int, bool, float, int]:
    """-> (height, width, bottom_up, exposure, offset of the pixel data)."""
    if not (data.startswith(b"#?RADIANCE") or data.startswith(b"#?RGBE") or data.startswith(b"#?")):
        raise EnvmapError(f"{path}: not a Radiance HDR file (bad signature)")
    pos = 0
    exposure = 1.0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise EnvmapError(f"{path}: truncated Radiance header")
        line = data[pos:end].strip()
        pos = end + 1
        if not line:
            break
        if line.startswith(b"FORMAT="):
            fmt = line[7:].decode("ascii", "replace")
            if fmt != "32-bit_rle_rgbe":
                raise EnvmapError(f"{path}: unsupported Radiance pixel format '{fmt}' (only 32-bit_rle_rgbe)")
        elif line.startswith(b"EXPOSURE="):
            try:
                exposure *= float(line[9:])
            except ValueError:
                raise EnvmapError(f"{path}: bad EXPOSURE line in the Radiance header") from None
    end = data.find(b"\n", pos)
    if end < 0:
        raise EnvmapError(f"{path}: truncated Radiance header (no resolution line)")
    tok = data[pos:end].decode("ascii", "replace").split()
    if len(tok) != 4 or tok[0] not in ("-Y", "+Y") or tok[2] != "+X":
        raise EnvmapError(f"{path}: unsupported Radiance resolution line '{' '.join(tok)}' (expected '-Y H +X W')")
    try:
        h, w = int(tok[1]), int(tok[3])
    except ValueError:
        raise EnvmapError(f"{path}: bad Radiance resolution line '{' '.join(tok)}'") from None
    if h <= 0 or w <= 0:
        raise EnvmapError(f"{path}: empty image ({w} x {h})")
    return h, w, tok[0] == "+Y", exposure, end + 1


def _decode_rle_scanline(data: bytes, pos: int, width: int, path: Path, y: int) -> tuple[bytes, int]:
    """Decode one new-style RLE scanline (4 separately encoded channels) -> (RRR..GGG..BBB..EEE.., new pos)."""
    out = bytearray()
    n_data = len(data)
    for _ in range(4):
        target = len(out) + width
        while len(out) < target:
            if pos >= n_data:
                raise EnvmapError(f"{path}: truncated pixel data at scanline {y}")
            count = data[pos]
            pos += 1
            if count > 128:  # a run of one repeated byte
                count -= 128
                if pos >= n_data:
                    raise EnvmapError(f"{path}: truncated pixel data at scanline {y}")
                out += data[pos:pos + 1] * count
                pos += 1
            else:  # literal bytes
                if count == 0 or pos + count > n_data:
                    raise EnvmapError(f"{path}: corrupted run-length data at scanline {y}")
                out += data[pos:pos + count]
                pos += count
            if len(out) > target:
                raise EnvmapError(f"{path}: corrupted run-length data at scanline {y} (run overflows)")
    return bytes(out), pos


def read_hdr(path: str | Path) -> np.ndarray:
    """Read a Radiance RGBE ``.hdr`` file.

    Returns:
        [H, W, 3] float32 linear radiance (divided by the header's EXPOSURE, top row first).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EnvmapError(f"{path}: file not found") from None
    except OSError as e:
        raise EnvmapError(f"{path}: cannot read file ({e.strerror})") from None
    h, w, bottom_up, exposure, pos = _parse_hdr_header(data, path)
    # run records expand at most 127 bytes per 2: refuse sizes the file cannot hold
    # (a corrupted header must not allocate gigabytes)
    if h * w * 4 > 64 * (len(data) - pos) + 4096:
        raise EnvmapError(f"{path}: header declares {w} x {h} pixels but the file holds only {len(data)} bytes")
    img = np.empty((h, w, 4), dtype=np.uint8)
    for y in range(h):
        head = data[pos:pos + 4]
        rle = 8 <= w < 32768 and len(head) == 4 and head[0] == 2 and head[1] == 2 and not head[2] & 0x80
        if rle:
            if (head[2] << 8 | head[3]) != w:
                raise EnvmapError(f"{path}: scanline {y} length does not match the image width")
            line, pos = _decode_rle_scanline(data, pos + 4, w, path, y)
            img[y] = np.frombuffer(line, dtype=np.uint8).reshape(4, w).T
        else:  # flat RGBE pixels
            if pos + 4 * w > len(data):
                raise EnvmapError(f"{path}: truncated pixel data at scanline {y}")
            img[y] = np.frombuffer(data, dtype=np.uint8, count=4 * w, offset=pos).reshape(w, 4)
            pos += 4 * w
    out = rgbe_to_float(img)
    if bottom_up:
        out = out[::-1]
    if exposure != 1.0 and exposure > 0:
        out = out / np.float32(exposure)
    return np.ascontiguousarray(out, dtype=np.float32)


def _encode_rle_channel(ch: np.ndarray) -> bytes:
    """Run-length encode one channel of one scanline (runs >= 4 become run records)."""
    out = bytearray()
    w = ch.shape[0]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ch)) + 1])
    lens = np.diff(np.concatenate([starts, [w]]))
    literal = bytearray()

    def flush() -> None:
        for i in range(0, len(literal), 128):
            chunk = literal[i:i + 128]
            out.append(len(chunk))
            out.extend(chunk)
        literal.clear()

    for s, n in zip(starts.tolist(), lens.tolist()):
        if n >= 4:
            flush()
            while n > 0:
                k = min(n, 127)
                out.append(128 + k)
                out.append(int(ch[s]))
                n -= k
        else:
            literal.extend(ch[s:s + n].tobytes())
    flush()
    return bytes(out)


def encode_hdr(img: np.ndarray) -> bytes:
    """Encode an [H, W, 3] float image as a Radiance file (RLE scanlines when 8 <= W < 32768)."""
    img = np.asarray(img, dtype=np.float32)
    h, w = img.shape[:2]
    rgbe = float_to_rgbe(img)
    parts = [b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n", f"-Y {h} +X {w}\n".encode("ascii")]
    use_rle = 8 <= w < 32768
    for y in range(h):
        if use_rle:
            parts.append(bytes([2, 2, w >> 8, w & 255]))
            for c in range(4):
                parts.append(_encode_rle_channel(rgbe[y, :, c]))
        else:
            parts.append(rgbe[y].tobytes())
    return b"".join(parts)


def write_hdr(path: str | Path, img: np.ndarray | Tensor) -> None:
    """Write [H, W, 3] linear radiance as a Radiance ``.hdr`` file (atomically)."""
    from hravatar.io.safe import atomic_write_bytes

    if isinstance(img, Tensor):
        img = img.detach().float().cpu().numpy()
    atomic_write_bytes(path, encode_hdr(img))


# --------------------------------------------------------------------------- OpenEXR
def read_exr(path: str | Path) -> np.ndarray:
    """Read the RGB (or luminance Y) channels of the first part of an OpenEXR file.

    Returns:
        [H, W, 3] float32.
    """
    import OpenEXR

    path = Path(path)
    if not path.is_file():
        raise EnvmapError(f"{path}: file not found")
    try:
        with OpenEXR.File(str(path)) as f:
            ch = {k: np.asarray(v.pixels) for k, v in f.channels().items()}
    except Exception as e:  # the bindings raise plain RuntimeError/ValueError with long texts
        msg = (str(e).splitlines() or ["unknown error"])[0][:120]
        raise EnvmapError(f"{path}: unreadable OpenEXR file ({msg})") from None
    if "RGB" in ch:
        rgb = ch["RGB"]
    elif "RGBA" in ch:
        rgb = ch["RGBA"][..., :3]
    elif all(c in ch for c in "RGB"):
        rgb = np.stack([ch["R"], ch["G"], ch["B"]], -1)
    elif "Y" in ch:
        rgb = np.repeat(ch["Y"][..., None], 3, -1)
    else:
        raise EnvmapError(f"{path}: OpenEXR file has no RGB or Y channels (found {sorted(ch)})")
    return np.ascontiguousarray(rgb, dtype=np.float32)


def write_exr(path: str | Path, img: np.ndarray | Tensor, half: bool | None = None) -> None:
    """Write [H, W, 3] linear radiance as a ZIP-compressed OpenEXR file (atomically).

    Args:
        half: store half floats; None picks half unless a value exceeds the half range (65504),
            as a bright sun often does.
    """
    import OpenEXR

    if isinstance(img, Tensor):
        img = img.detach().float().cpu().numpy()
    img = np.asarray(img, dtype=np.float32)
    if half is None:
        half = bool(np.abs(img).max(initial=0.0) <= 65504.0)
    arr = np.ascontiguousarray(img, dtype=np.float16 if half else np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"compression": OpenEXR.ZIP_COMPRESSION, "type": OpenEXR.scanlineimage}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".exr", dir=path.parent)
    os.close(fd)
    try:
        with OpenEXR.File(header, {"RGB": arr}) as f:
            f.write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- generic
def _read_ldr(path: Path) -> np.ndarray:
    import imageio.v3 as iio

    try:
        img = np.asarray(iio.imread(path))
    except Exception as e:
        msg = (str(e).splitlines() or ["unknown error"])[0][:120]
        raise EnvmapError(f"{path}: unreadable image ({msg})") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    x = img[..., :3].astype(np.float32) / float(np.iinfo(img.dtype).max if img.dtype.kind in "ui" else 1.0)
    # sRGB-encoded 8/16-bit images are decoded to linear light
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:
        msg = (str(e).splitlines() or ["unknown error"])[0][:120]
        raise EnvmapError(f"{path}: unreadable .npy file ({msg})") from None
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or arr.dtype.kind != "f":
        raise EnvmapError(f"{path}: expected a float array [H, W, 3], found {arr.dtype} {tuple(arr.shape)}")
    return np.ascontiguousarray(arr[..., :3], dtype=np.float32)


def load_envmap(path: str | Path, device=None) -> Tensor:
    """Load a lat-long environment map as linear HDR radiance.

    Small negative values (lossy EXR compression ringing) are clamped to 0.

    Args:
        path: ``.hdr``, ``.exr``, ``.npy`` or ``.png``/``.jpg`` file.
        device: target device.
    Returns:
        [H, W, 3] float32 with W = 2 H.
    Raises:
        EnvmapError: missing/unreadable file, unsupported format, not 2:1, NaN or inf values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise EnvmapError(f"{path}: unsupported environment map format '{suffix}' (expected {', '.join(SUPPORTED_SUFFIXES)})")
    if not path.is_file():
        raise EnvmapError(f"{path}: file not found")
    if suffix == ".hdr":
        img = read_hdr(path)
    elif suffix == ".exr":
        img = read_exr(path)
    elif suffix == ".npy":
        img = _read_npy(path)
    else:
        img = _read_ldr(path)
    h, w = img.shape[:2]
    if w != 2 * h:
        raise EnvmapError(f"{path}: not a lat-long map ({w} x {h}; expected width = 2 x height)")
    if not np.isfinite(img).all():
        raise EnvmapError(f"{path}: contains NaN or infinite values")
    img = np.maximum(img, 0.0)
    return torch.from_numpy(img).to(device)


def save_envmap(path: str | Path, latlong: Tensor | np.ndarray) -> None:
    """Write a lat-long map as ``.hdr`` or ``.exr`` (by suffix), atomically.

    Args:
        latlong: [H, W, 3] linear radiance.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".hdr":
        write_hdr(path, latlong)
    elif suffix == ".exr":
        write_exr(path, latlong)
    else:
        raise EnvmapError(f"{path}: cannot write environment maps as '{suffix}' (use .hdr or .exr)")
