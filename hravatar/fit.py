"""``hravatar fit VIDEO --out RUN_DIR``: preprocess, train, evaluate and render a preview in one go.

    RUN_DIR/dataset/        the prepared dataset (docs/dataset-format.md) with QC.mp4 and qc.json
    RUN_DIR/avatar.safetensors, state.safetensors, events.jsonl, previews/   the training run
    RUN_DIR/eval.json (+ .md, _strip.png)   self-reenactment metrics on the held-out last frames
    RUN_DIR/preview.mp4     ground truth | avatar on the test frames, then a light turntable

Every stage is resumable: running the same command again skips finished stages and continues
an interrupted training run from its last checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch


def render_preview(run_dir: Path, data: Path, out: Path, device, fps: float = 25.0, max_frames: int = 150) -> Path:
    """Side-by-side video of the test frames (ground truth | avatar under its learned light)."""
    import imageio.v2 as iio2

    from hravatar.data import HeadVideoDataset
    from hravatar.eval.evaluate import _encoder_from_bundle, _train_config, resolve_checkpoint
    from hravatar.io.checkpoint import load_checkpoint
    from hravatar.io.safe import atomic_write_bytes
    from hravatar.shading import LearnedLighting, load_brdf_lut
    from hravatar.train.model import encoded_frame, face_crop_boxes, forward_render

    bundle = load_checkpoint(resolve_checkpoint(run_dir), device)
    cfg = _train_config(bundle)
    ds = HeadVideoDataset(data, "test", resolution=cfg.resolution, device=device)
    light = LearnedLighting(**bundle.light_config).to(device)
    light.load_state_dict(bundle.light_state)
    lut = load_brdf_lut(device)
    enc = _encoder_from_bundle(bundle, cfg, device)
    boxes = face_crop_boxes(ds, device) if enc is not None else None
    tmp = out.with_name(f".{out.name}.tmp.mp4")
    writer = iio2.get_writer(str(tmp), fps=fps, codec="libx264", quality=8, macro_block_size=1)
    try:
        with torch.no_grad():
            env = light.environment()
            for i in range(min(len(ds), max_frames)):
                s = ds[i]
                f = s.params.to(device)
                if enc is not None:
                    f, _ = encoded_frame(enc, f, s.image.to(device), boxes[i], cfg.encoder_res)
                r = forward_render(bundle.avatar, f, s.camera.to(device), env, lut, response=cfg.camera_response, shading=cfg.shading)
                img = torch.cat([s.image.to(device), r["rgb"].clamp(0, 1)], 1)
                writer.append_data((img.cpu().numpy() * 255 + 0.5).astype(np.uint8))
    finally:
        writer.close()
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink(missing_ok=True)
    return out


def fit_video(video: str | Path, run_dir: str | Path, config=None, device=None, preprocess_config=None,
              progress: Callable | None = None, bus_listeners=()) -> dict:
    """Video -> dataset -> trained avatar -> ``eval.json`` and ``preview.mp4``.

    Args:
        video: input video.
        run_dir: output folder (layout in the module docstring).
        config: :class:`hravatar.train.config.TrainConfig` (the "quick" profile if None).
        device: torch device (CUDA when available if None).
        preprocess_config: :class:`hravatar.data.preprocess.PreprocessConfig` (frames stored at the
            training resolution if None).
        progress: optional ``(stage, done, total)`` callback for the preprocessing stages.
        bus_listeners: training event listeners (progress display, logs).
    Returns:
        the evaluation result (same keys as ``hravatar eval``).
    """
    from hravatar.data.preprocess import PreprocessConfig, preprocess_video
    from hravatar.eval.evaluate import evaluate, write_report
    from hravatar.train.config import profile_config
    from hravatar.train.trainer import Trainer

    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = config or profile_config("quick")
    data = run_dir / "dataset"
    if not (data / "dataset.json").exists():
        pcfg = preprocess_config or PreprocessConfig(res=cfg.resolution)
        preprocess_video(video, data, pcfg, progress=progress)
    trainer = Trainer(data, run_dir, cfg, device=device)
    for fn in bus_listeners:
        trainer.bus.subscribe(fn)
    trainer.run(resume=True)
    res = evaluate(run_dir, data, device, strip_path=run_dir / "eval_strip.png")
    write_report(res, run_dir / "eval.json", run_dir.name)
    fps = float(trainer.train_set.meta.fps or 25.0)
    render_preview(run_dir, data, run_dir / "preview.mp4", device, fps=fps)
    return res
