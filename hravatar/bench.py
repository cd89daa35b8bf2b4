"""``hravatar bench``: time deformation, rasterization and shading separately."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_bench(device: str, gaussians: list[int], resolutions: list[int], reps: int = 10, warmup: int = 3,
              backend: str = "auto", env_name: str = "studio", compile: bool = False) -> dict:
    """Benchmark deform + raster + shade (no gradients) of the built-in head avatar.

    ``compile``: deformation and shading through ``torch.compile``; the first warm-up render
    (which compiles) is reported as ``first_ms`` and not counted in the medians.

    Returns:
        {"device": str, "backend": str, "compiled": bool, "machine": {...}, "results":
        [{"gaussians", "res", "fps", "first_ms", "ms": {"deform", "raster", "shade", "total"}}]}
        with medians over ``reps``.
    """
    from hravatar.api import default_camera, resolve_environment, untrained_avatar
    from hravatar.render.pipeline import AvatarRenderer, RenderSettings
    from hravatar.render.rasterize import select_backend

    dev = torch.device(device)
    env, tm = resolve_environment(f"builtin:{env_name}")
    results = []
    compiled = False
    for n in gaussians:
        bundle = untrained_avatar(num_gaussians=n)
        renderer = AvatarRenderer(bundle.avatar, dev, backend=backend, compile=compile)
        for res in resolutions:
            cam = default_camera(bundle, res)
            settings = RenderSettings(tonemap=tm)
            t0 = time.perf_counter()
            renderer.render(cam, None, env, settings)
            first_ms = (time.perf_counter() - t0) * 1e3
            for _ in range(warmup - 1):
                renderer.render(cam, None, env, settings)
            samples = []
            for _ in range(reps):
                samples.append(renderer.render(cam, None, env, settings).timings)
            ms = {k: statistics.median(s[k] for s in samples) for k in ("deform", "raster", "shade", "total")}
            results.append({"gaussians": n, "res": res, "fps": 1000.0 / ms["total"], "first_ms": first_ms, "ms": ms})
            compiled = renderer.compiled
    return {"device": str(dev), "backend": select_backend(dev, backend), "compiled": compiled, "machine": machine_info(dev),
            "date": time.strftime("%Y-%m-%d"), "results": results}


def write_json(obj: dict, path: str | Path) -> None:
    from hravatar.io.safe import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())
