"""Deferred pipeline: G-buffer normalisation, shading of known scenes, channels."""
import math

import pytest
import torch

from hravatar.avatar.gaussians import DeformedGaussians
from hravatar.render.camera import Camera, intrinsics_from_fov, look_at
from hravatar.render.pipeline import MaterialEdit, render_gbuffers, shade_gbuffers
from hravatar.shading import constant_environment, load_brdf_lut
from hravatar.shading.brdf import integrate_split_sum
from hravatar.utils.rotation import quat_to_matrix


def _disc_scene(opacity=0.7, albedo=(0.8, 0.4, 0.2), rough=0.6, f0=0.04):
    """One flat Gaussian disc at the origin facing +z, seen by a camera on +z."""
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    scales = torch.tensor([[0.02, 0.02, 0.001]])
    g = DeformedGaussians(
        means=torch.zeros(1, 1, 3), quats=q[None], scales=scales[None],
        opacities=torch.tensor([opacity]), albedo=torch.tensor([albedo]),
        roughness=torch.tensor([[rough]]), f0=torch.tensor([[f0]]), rotmats=quat_to_matrix(q)[None],
    )
    cam = Camera(look_at((0.0, 0.0, 0.5), (0.0, 0.0, 0.0)), intrinsics_from_fov(20.0, 33, 33), 33, 33)
    return g, cam


def test_gbuffers_are_alpha_normalised():
    g, cam = _disc_scene(opacity=0.5)
    gb = render_gbuffers(g, cam, backend="torch")
    c = 16
    assert gb.alpha[c, c, 0] == pytest.approx(0.5, abs=1e-4)  # centre of the Gaussian: alpha = opacity
    assert torch.allclose(gb.albedo[c, c], torch.tensor([0.8, 0.4, 0.2]), atol=1e-4)
    assert gb.roughness[c, c, 0] == pytest.approx(0.6, abs=1e-4)
    # the disc faces the camera: normal = +z (towards the camera)
    assert torch.allclose(gb.normal[c, c], torch.tensor([0.0, 0.0, 1.0]), atol=1e-4)
    assert gb.depth[c, c, 0] == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("compact", [True, False])
def test_shading_of_constant_environment_matches_split_sum_integral(compact):
    L, albedo, rough, f0 = 0.7, (0.8, 0.4, 0.2), 0.6, 0.04
    g, cam = _disc_scene(opacity=0.9, albedo=albedo, rough=rough, f0=f0)
    gb = render_gbuffers(g, cam, backend="torch")
    out = shade_gbuffers(gb, cam, constant_environment(L), load_brdf_lut(), compact=compact)
    c = 16
    nov = float((gb.normal[c, c] * cam.view_dirs()[c, c]).sum())
    # independent: float64 quadrature of the split-sum terms, Fresnel with roughness by hand
    A, B = (float(x) for x in integrate_split_sum(torch.tensor([nov], dtype=torch.float64), torch.tensor([rough], dtype=torch.float64), 4096).reshape(-1))
    F = f0 + (max(1 - rough, f0) - f0) * 2 ** ((-5.55473 * nov - 6.98316) * nov)
    expect = torch.tensor(albedo) * L + L * (F * A + B)
    assert torch.allclose(out["shaded"][c, c], expect.float(), atol=5e-3)
    assert torch.allclose(out["diffuse"][c, c], torch.tensor(albedo) * L, atol=1e-4)
    # uncovered pixels stay zero
    assert out["shaded"][0, 0].abs().sum() == 0


def test_compact_and_full_frame_shading_agree():
    from hravatar.shading import make_builtin_environment, prefilter_latlong

    g, cam = _disc_scene(opacity=0.8, rough=0.3)
    gb = render_gbuffers(g, cam, backend="torch")
    env, lut = prefilter_latlong(make_builtin_environment("sunset", width=64)), load_brdf_lut()
    a = shade_gbuffers(gb, cam, env, lut, rotation_deg=40.0, compact=True)
    b = shade_gbuffers(gb, cam, env, lut, rotation_deg=40.0, compact=False)
    assert (a["shaded"].abs().sum(-1) > 0).sum() > 20  # the disc covers pixels
    for k in ("shaded", "diffuse", "specular", "irradiance"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_material_edits_follow_the_method():
    g, cam = _disc_scene(rough=0.8, f0=0.04)
    gb = render_gbuffers(g, cam, backend="torch")
    env, lut = constant_environment(1.0), load_brdf_lut()
    base = shade_gbuffers(gb, cam, env, lut)
    shiny = shade_gbuffers(gb, cam, env, lut, material=MaterialEdit(f0_edit=0.5))
    assert (shiny["specular"][16, 16] > base["specular"][16, 16] * 3).all()  # F0 0.04 -> 0.52
    red = shade_gbuffers(gb, cam, env, lut, material=MaterialEdit(tint=(1.0, 0.0, 0.0)))
    assert red["diffuse"][16, 16, 1:].abs().max() < 1e-6


def test_shading_is_differentiable_through_masking():
    g, cam = _disc_scene()
    g.albedo.requires_grad_(True)
    gb = render_gbuffers(g, cam, backend="torch")
    out = shade_gbuffers(gb, cam, constant_environment(1.0), load_brdf_lut())
    out["shaded"].sum().backward()
    assert g.albedo.grad is not None and (g.albedo.grad > 0).all()


def test_renderer_follows_a_change_of_environment():
    """The renderer keeps a device copy of the last environment: a new one must replace it."""
    from hravatar.api import default_camera, resolve_environment, untrained_avatar
    from hravatar.render.pipeline import AvatarRenderer, RenderSettings

    bundle = untrained_avatar(num_gaussians=2000)
    r = AvatarRenderer(bundle.avatar, "cpu", backend="torch")
    cam = default_camera(bundle, 32)
    s = RenderSettings(tonemap="aces")
    bright, dark = constant_environment(2.0), constant_environment(0.2)
    a = r.render(cam, None, bright, s).linear
    b = r.render(cam, None, dark, s).linear
    torch.testing.assert_close(b * 10.0, a, rtol=1e-4, atol=1e-5)  # shading is linear in the light
    torch.testing.assert_close(r.render(cam, None, bright, s).linear, a)


def _compile_scene():
    from hravatar.api import default_camera, resolve_environment, untrained_avatar
    from hravatar.render.pipeline import RenderSettings

    bundle = untrained_avatar(num_gaussians=2000)
    env, tm = resolve_environment("builtin:studio")
    edits = [RenderSettings(tonemap=tm),
             RenderSettings(tonemap=tm, rotation_deg=40.0, material=MaterialEdit(rough_scale=0.6, f0_edit=0.5, tint=(1.0, 0.8, 0.7)))]
    return bundle, default_camera(bundle, 48), env, edits


def _has_cxx() -> bool:
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


@pytest.mark.slow
@pytest.mark.skipif(not _has_cxx(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_renderer_matches_the_eager_one():
    """``compile=True`` (fused deformation and full-frame shading) renders the same images as eager,
    for a second environment rotation and material edit too (these are inputs, not constants)."""
    from hravatar.render.pipeline import AvatarRenderer

    bundle, cam, env, settings = _compile_scene()
    eager = AvatarRenderer(bundle.avatar, "cpu", backend="torch")
    fused = AvatarRenderer(bundle.avatar, "cpu", backend="torch", compile=True)
    for s in settings:
        a, b = eager.render(cam, None, env, s), fused.render(cam, None, env, s)
        torch.testing.assert_close(b.linear, a.linear, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.image, a.image, rtol=1e-4, atol=1e-5)
    assert fused.compiled and not eager.compiled
    # and shading traces as one graph (a graph break would return to Python mid-frame)
    from functools import partial

    gb = render_gbuffers(eager.deform(bundle.avatar.neutral_frame()), cam)
    ex = torch._dynamo.explain(partial(shade_gbuffers, compact=False))(gb, cam, env, eager.brdf_lut, 40.0, settings[1].material)
    assert ex.graph_break_count == 0, [str(b.reason)[:120] for b in ex.break_reasons]


def test_a_failing_compile_falls_back_to_eager(monkeypatch):
    """If the compiled function fails (no compiler, no Triton), the renderer warns once and renders
    exactly what the eager renderer does from then on."""
    from hravatar.render.pipeline import AvatarRenderer

    calls = []

    def broken_compile(fn, **kw):
        def run(*a, **k):
            calls.append(fn)
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    bundle, cam, env, settings = _compile_scene()
    eager = AvatarRenderer(bundle.avatar, "cpu", backend="torch")
    fused = AvatarRenderer(bundle.avatar, "cpu", backend="torch", compile=True)
    assert fused.compiled
    with pytest.warns(RuntimeWarning, match="torch.compile of the deformation failed .*InvalidCxxCompiler"):
        with pytest.warns(RuntimeWarning, match="shading failed"):
            b = fused.render(cam, None, env, settings[1])
    assert not fused.compiled and len(calls) == 2
    torch.testing.assert_close(b.image, eager.render(cam, None, env, settings[1]).image)
    fused.render(cam, None, env, settings[0])
    assert len(calls) == 2  # the broken version is not tried again


@pytest.mark.gpu
def test_compiled_renderer_on_cuda_matches_the_cpu():
    """On a GPU (Triton kernels): the compiled renderer's image against the eager CPU one."""
    from hravatar.render.pipeline import AvatarRenderer

    bundle, cam, env, settings = _compile_scene()
    cpu = AvatarRenderer(bundle.avatar, "cpu", backend="torch")
    refs = [cpu.render(cam, None, env, s).image for s in settings]
    gpu = AvatarRenderer(bundle.avatar, "cuda", backend="torch", compile=True)  # moves the avatar
    torch.backends.cuda.matmul.allow_tf32 = False
    for s, ref in zip(settings, refs):
        torch.testing.assert_close(gpu.render(cam, None, env, s).image.cpu(), ref, rtol=1e-3, atol=1e-4)
    assert gpu.compiled
