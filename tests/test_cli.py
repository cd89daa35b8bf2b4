"""End-to-end CLI checks on the built-in head (tiny resolutions)."""
import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import SHARED

from hravatar.cli.main import main


def test_render_png_of_builtin_head(tmp_path):
    out = tmp_path / "h.png"
    assert main(["render", "--out", str(out), "--res", "96", "--envmap", "builtin:studio"]) == 0
    img = iio.imread(out)
    assert img.shape == (96, 96, 3)
    # a head in the middle, white background at the corners
    assert (img[:4, :4] == 255).all()
    centre = img[30:66, 30:66].astype(float)
    assert centre.mean() < 230 and centre.std() > 5


def test_render_channels_and_edits(tmp_path):
    imgs = {}
    for ch in ("albedo", "normal", "alpha", "depth", "specular"):
        out = tmp_path / f"{ch}.png"
        assert main(["render", "--out", str(out), "--res", "64", "--channel", ch]) == 0
        imgs[ch] = iio.imread(out).astype(float)
    a = imgs["alpha"][..., 0] / 255
    assert a.max() > 0.99 and a[:3, :3].max() < 0.01  # opaque head, empty corners
    # normals: the head faces the camera, so the mean normal's z (blue) is high on the head
    n = imgs["normal"][a > 0.99] / 255 * 2 - 1
    assert n[:, 2].mean() > 0.4
    assert np.abs(imgs["albedo"] - imgs["specular"]).mean() > 5


def test_render_with_shared_hdri_and_rotation(tmp_path):
    exr = SHARED / "data" / "hdri" / "sunset.exr"
    if not exr.exists():
        pytest.skip("../shared HDR maps not available")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["render", "--out", str(a), "--res", "64", "--envmap", str(exr)]) == 0
    assert main(["render", "--out", str(b), "--res", "64", "--envmap", str(exr), "--rotate", "120"]) == 0
    ia, ib = iio.imread(a).astype(float), iio.imread(b).astype(float)
    assert np.abs(ia - ib).mean() > 1.0  # rotating the light changes the shading


def test_render_turntable_mp4(tmp_path):
    out = tmp_path / "t.mp4"
    assert main(["render", "--out", str(out), "--res", "48", "--frames", "3"]) == 0
    import imageio.v2 as iio2

    r = iio2.get_reader(str(out))
    n = sum(1 for _ in r)
    r.close()
    assert n == 3


def test_bad_inputs_give_one_line_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage" * 10)
    r = subprocess.run([sys.executable, "-m", "hravatar.cli.main", "render", str(bad), "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "bad.safetensors" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "hravatar.cli.main", "render", "--out", str(tmp_path / "x.png"),
                        "--envmap", str(tmp_path / "missing.hdr"), "--res", "32"], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.hdr" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "hravatar.cli.main", "render", "--out", str(tmp_path / "x.png"),
                        "--expr", "notAThing=1", "--res", "32"], capture_output=True, text=True)
    assert r.returncode == 2 and "notAThing" in r.stderr


def test_info_export_and_bench(tmp_path, capsys):
    from hravatar.api import untrained_avatar
    from hravatar.io.checkpoint import save_checkpoint
    from hravatar.io.ply import read_gaussian_ply

    b = untrained_avatar(num_gaussians=3000)
    ck = tmp_path / "a.safetensors"
    save_checkpoint(ck, b)
    assert main(["info", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "3,000" in out and "jawOpen" in out
    ply = tmp_path / "a.ply"
    assert main(["export", str(ck), "--out", str(ply), "--expr", "jawOpen=0.5"]) == 0
    g = read_gaussian_ply(ply)
    assert g["means"].shape == (3000, 3)
    assert 0.05 < float(g["colors"].mean()) < 0.95
    js = tmp_path / "b.json"
    assert main(["bench", "--gaussians", "2000", "--res", "48", "--reps", "2", "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["device"] == "cpu"
    r0 = res["results"][0]
    assert r0["gaussians"] == 2000 and r0["res"] == 48 and r0["fps"] > 0
    assert set(r0["ms"]) >= {"deform", "raster", "shade"}


def test_train_options_reach_the_config_including_variable_length_tuples():
    from hravatar.cli.main import build_parser, train_config_from_args

    a = build_parser().parse_args(["train", "data", "--out", "run", "--profile", "quick", "--loss-surface", "0.1",
                                   "--loss-surface-regions", "face", "neck"])
    cfg = train_config_from_args(a)
    assert cfg.loss.surface == 0.1 and cfg.loss.surface_regions == ("face", "neck")
    assert cfg.resolution == 256  # the profile's values stay where no option was given
    one = train_config_from_args(build_parser().parse_args(["train", "d", "--out", "r", "--loss-surface-regions", "face"]))
    assert one.loss.surface_regions == ("face",)
