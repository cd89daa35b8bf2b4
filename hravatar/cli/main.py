"""The ``hravatar`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


class CliError(Exception):
    """An expected failure: printed as one line, exit code 2."""


def _device(name: str | None) -> str:
    import torch

    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError("--device cuda requested but no CUDA device is available")
    return name


def _save_image(img, path: Path) -> None:
    import imageio.v3 as iio
    import numpy as np

    from hravatar.io.safe import atomic_write_bytes

    arr = (img.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    atomic_write_bytes(path, iio.imwrite("<bytes>", arr, extension=path.suffix))


def cmd_render(a: argparse.Namespace) -> None:
    import imageio.v2 as iio2
    import numpy as np

    from hravatar.api import default_camera, open_avatar, parse_expression_args, resolve_environment
    from hravatar.render.pipeline import AvatarRenderer, MaterialEdit, RenderSettings

    dev = _device(a.device)
    bundle = open_avatar(a.checkpoint, dev)
    env, tm = resolve_environment(a.envmap, bundle)
    try:
        frame = parse_expression_args(bundle.avatar, a.expr, a.jaw)
    except ValueError as e:
        raise CliError(str(e)) from None
    renderer = AvatarRenderer(bundle.avatar, dev, backend=a.backend)
    mat = MaterialEdit(rough_scale=a.rough_scale, f0_edit=a.f0_edit, tint=tuple(a.tint))
    settings = RenderSettings(channel=a.channel, rotation_deg=a.rotate, exposure=a.exposure, tonemap=tm,
                              background=tuple(a.background), material=mat)
    out = Path(a.out)
    if out.suffix.lower() == ".mp4":
        tmp = out.with_name(f".{out.name}.tmp.mp4")
        writer = iio2.get_writer(str(tmp), fps=a.fps, codec="libx264", quality=8, macro_block_size=1)
        try:
            for i in range(a.frames):
                t = i / a.frames
                if a.turntable == "light":
                    settings.rotation_deg = a.rotate + 360.0 * t
                    cam = default_camera(bundle, a.res)
                else:
                    cam = default_camera(bundle, a.res, yaw_deg=60.0 * np.sin(2 * np.pi * t))
                img = renderer.render(cam, frame, env, settings).image
                writer.append_data((img.clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8))
        finally:
            writer.close()
        tmp.replace(out)
    else:
        img = renderer.render(default_camera(bundle, a.res, yaw_deg=a.yaw), frame, env, settings).image
        _save_image(img, out)
    print(f"wrote {out}")


def cmd_info(a: argparse.Namespace) -> None:
    from hravatar.io.checkpoint import load_checkpoint

    b = load_checkpoint(a.checkpoint)
    av, m = b.avatar, b.meta
    print(f"checkpoint   {a.checkpoint}")
    print(f"format       {m.get('format')} v{m.get('version')}  created {m.get('created', '?')}")
    print(f"head model   {av.head_identity or '?'}")
    print(f"gaussians    {av.num_gaussians:,}")
    print(f"expressions  {av.num_expr}: {', '.join(av.expr_names[:12])}{' ...' if av.num_expr > 12 else ''}")
    print(f"shape dims   {av.params['shapedirs'].shape[-1]}   global scale {float(av.log_global_scale.detach().exp()):.4f}")
    print(f"lighting     {'learned (' + ', '.join(sorted(b.light_state)) + ')' if b.light_state else 'none stored'}")
    print(f"sequence     {b.sequence.expr.shape[0] if b.sequence is not None else 0} tracked frames")
    if b.camera is not None:
        print(f"camera       {b.camera.width}x{b.camera.height}, fx={float(b.camera.K[0, 0]):.1f}")
    for k in ("data", "train"):
        if k in m:
            print(f"{k:<12} {m[k]}")
    if b.extra:
        print(f"extra        {', '.join(sorted(b.extra))[:200]}")


def cmd_export(a: argparse.Namespace) -> None:
    import torch

    from hravatar.api import default_camera, open_avatar, parse_expression_args, resolve_environment
    from hravatar.avatar.gaussians import gaussian_normals
    from hravatar.io.ply import write_gaussian_ply
    from hravatar.shading import load_brdf_lut, shade, tonemap

    bundle = open_avatar(a.checkpoint)
    env, tm = resolve_environment(a.envmap, bundle)
    frame = parse_expression_args(bundle.avatar, a.expr, a.jaw)
    with torch.no_grad():
        g = bundle.avatar.deform(frame)
        cam = default_camera(bundle, 512)
        cam_pos = cam.position
        means, R, sc = g.means[0], g.rotmats[0], g.scales[0]
        n = gaussian_normals(R, sc, means, cam_pos)
        v = torch.nn.functional.normalize(cam_pos - means, dim=-1)
        col = shade(g.albedo, g.roughness, g.f0, n, v, env, load_brdf_lut("cpu"))["rgb"]
        col = tonemap(col, exposure_stops=0.0, operator=tm)
    write_gaussian_ply(a.out, means, g.quats[0], sc, g.opacities, col)
    print(f"wrote {a.out} ({means.shape[0]:,} Gaussians)")


def cmd_bench(a: argparse.Namespace) -> None:
    import torch

    from hravatar.bench import run_bench, write_json

    if a.threads:
        torch.set_num_threads(a.threads)
    res = run_bench(_device(a.device), a.gaussians, a.res, reps=a.reps, backend=a.backend, compile=a.compile)
    if a.compile and not res["compiled"]:
        print("torch.compile failed (see the warning above): the figures are of the uncompiled path")
    for r in res["results"]:
        ms = r["ms"]
        print(f"{r['gaussians']:>7,} G  {r['res']:>4}px  {r['fps']:7.1f} fps   deform {ms['deform']:6.1f} ms  raster {ms['raster']:6.1f} ms  shade {ms['shade']:6.1f} ms"
              f"   (first frame {r['first_ms'] / 1e3:.1f} s)")
    if a.json:
        write_json(res, a.json)
        print(f"wrote {a.json}")


# nested config groups of TrainConfig and their option prefixes
_TRAIN_GROUPS = (("avatar", "avatar-"), ("light", "light-"), ("loss", "loss-"), ("lr", "lr-"), ("densify", "densify-"))


def train_config_from_args(a: argparse.Namespace):
    """The profile's TrainConfig with every option given on the command line applied."""
    from dataclasses import replace

    from hravatar.train.config import profile_config
    from hravatar.utils.dataclass_cli import apply_overrides

    cfg = apply_overrides(profile_config(a.profile), a)
    for name, prefix in _TRAIN_GROUPS:
        cfg = replace(cfg, **{name: apply_overrides(getattr(cfg, name), a, prefix)})
    return cfg


def cmd_synth(a: argparse.Namespace) -> None:
    from rich.progress import Progress

    from hravatar.data.synth import SynthConfig, generate_synthetic

    cfg = SynthConfig(frames=a.frames, res=a.res, seed=a.seed, gaussians=a.gaussians)
    with Progress() as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done)

        out = generate_synthetic(a.out_dir, cfg, progress=cb, device=_device(a.device))
    print(f"wrote {out}")


def cmd_train(a: argparse.Namespace) -> None:
    import signal
    import threading

    from hravatar.train.events import JsonlLog, RichProgress, TensorBoardLog
    from hravatar.train.trainer import Trainer, TrainingStopped

    cfg = train_config_from_args(a)
    trainer = Trainer(a.dataset, a.out, cfg, device=_device(a.device))
    log = JsonlLog(Path(a.out) / "events.jsonl")
    trainer.bus.subscribe(log)
    if not a.quiet:
        trainer.bus.subscribe(RichProgress())
    try:
        trainer.bus.subscribe(TensorBoardLog(Path(a.out) / "tb"))
    except ImportError:
        pass  # TensorBoard is optional; events.jsonl always has everything

    # A clean stop (checkpoint, then exit 0) is requested by the stop file or by SIGINT/SIGTERM;
    # the trainer checks it before every iteration (a stat per iteration is negligible).
    stop_file = Path(a.stop_file) if a.stop_file else None
    signalled: list[int] = []  # mutated by the signal handler
    started: list[bool] = []  # the main loop has begun (before that there is nothing to save)
    trainer.bus.subscribe(lambda ev: ev["kind"] == "start" and started.append(True))

    def on_signal(signum, _frame) -> None:
        if not started or signalled:  # still setting up, or asked twice: abort at once
            raise KeyboardInterrupt
        signalled.append(signum)
        print(f"hravatar: stopping after this iteration (signal {signum}); signal again to abort", file=sys.stderr)

    def stop_requested() -> bool:
        return bool(signalled) or (stop_file is not None and stop_file.exists())

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers only work there
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, on_signal)
    try:
        path = trainer.run(resume=a.resume, stop_flag=stop_requested)
    except TrainingStopped as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise CliError(f"interrupted; the last checkpoint in {a.out} (if any) is kept") from None
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        log.close()
    if path is None:
        if stop_file is not None:
            stop_file.unlink(missing_ok=True)
        print("stopped during the encoder pre-training; nothing was saved yet (start again)")
    elif trainer.iteration < trainer.total:
        if stop_file is not None and stop_file.exists():
            stop_file.unlink(missing_ok=True)  # honoured: a later run must not stop at once
        print(f"stopped at iteration {trainer.iteration}/{trainer.total}; wrote {path} (continue with --resume)")
    else:
        print(f"wrote {path}")


def cmd_preprocess(a: argparse.Namespace) -> None:
    from rich.progress import Progress

    from hravatar.data.format import partial_path
    from hravatar.data.preprocess import PreprocessConfig, PreprocessError, preprocess_video
    from hravatar.track.landmarks import MediaPipeMissing

    cfg = PreprocessConfig(res=a.res, max_frames=a.max_frames, head=a.head, test_frac=a.test_frac,
                           landmarker=a.landmarker, fps=a.fps, qc=not a.no_qc, device=_device(a.device),
                           threads=a.threads or None)
    labels = {"detect": "decode + landmarks", "camera": "camera + identity", "track": "tracking", "write": "crop, matte, write"}
    try:
        with Progress(disable=a.quiet) as prog:
            tasks: dict[str, int] = {}

            def cb(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = prog.add_task(labels.get(stage, stage), total=total or None)
                prog.update(tasks[stage], completed=done, total=total or None)

            rep = preprocess_video(a.video, a.out, cfg, progress=cb, overwrite=a.overwrite)
    except (PreprocessError, MediaPipeMissing) as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        raise CliError(f"interrupted; run the same command again to resume (work kept in {partial_path(a.out)})") from None
    d, tr = rep["dataset"], rep["tracking"]
    print(f"wrote {a.out}: {d['frames']} frames ({d['train']} train, {d['test']} test) at {d['res']}x{d['res']}, "
          f"landmark error {100 * tr['mean_error_rel']:.2f}% of the face size ({tr['mean_error_px']:.2f} px) mean, "
          f"{100 * tr['max_error_rel']:.2f}% max; fov {rep['camera']['fov_deg']:g} deg")
    for w in rep["warnings"]:
        print(f"note: {w}")
    print(f"QC: {Path(a.out) / 'QC.mp4'} and {Path(a.out) / 'qc.json'}" if cfg.qc else f"QC: {Path(a.out) / 'qc.json'}")


ABLATIONS = {
    "full": {},
    "no_encoder": {"encoder": False},
    "no_learnable_deformation": {"deformation": "fixed"},
    "shared_mlp_deformation": {"deformation": "mlp"},
    "rigged_to_mesh": {"deformation": "mesh"},
    "no_pbs": {"shading": "color"},
}


def cmd_eval(a: argparse.Namespace) -> None:
    from dataclasses import replace

    from hravatar.eval.evaluate import evaluate, markdown_table, write_report
    from hravatar.io.safe import atomic_write_bytes

    dev = _device(a.device)
    if a.ablations:
        import json

        from hravatar.train.trainer import Trainer

        base = Path(a.target)
        rows = {}
        for name, over in ABLATIONS.items():
            run = base / name
            cfg = replace(train_config_from_args(a), **over)
            if not (run / "avatar.safetensors").exists() or a.retrain:
                Trainer(a.data, run, cfg, device=dev).run(resume=True)
            rows[name] = evaluate(run, a.data, dev, max_frames=a.max_frames)
            print(f"{name}: PSNR {rows[name]['psnr']:.2f} dB")
        table = markdown_table(rows)
        out = Path(a.json) if a.json else base / "ablations.json"
        atomic_write_bytes(out, (json.dumps(rows, indent=2) + "\n").encode())
        atomic_write_bytes(out.with_suffix(".md"), table.encode())
        print(table)
        return
    if not a.json and Path(a.target).is_dir():
        a.json = str(Path(a.target) / "eval.json")  # a run folder keeps its evaluation
    strip = Path(a.json).with_name(Path(a.json).stem + "_strip.png") if a.json else None
    res = evaluate(a.target, a.data, dev, max_frames=a.max_frames, strip_path=strip)
    if a.json:
        write_report(res, a.json, Path(a.target).name)
        print(f"wrote {a.json}, {Path(a.json).with_suffix('.md')} and {strip}")
    print(markdown_table({Path(a.target).name: res}))


def cmd_fit(a: argparse.Namespace) -> None:
    """Video -> dataset -> avatar -> eval.json + preview.mp4 (see hravatar/fit.py)."""
    from rich.progress import Progress

    from hravatar.data.preprocess import PreprocessConfig, PreprocessError
    from hravatar.eval.evaluate import markdown_table
    from hravatar.fit import fit_video
    from hravatar.track.landmarks import MediaPipeMissing
    from hravatar.train.events import JsonlLog, RichProgress
    from hravatar.train.trainer import TrainingStopped

    cfg = train_config_from_args(a)
    pcfg = PreprocessConfig(res=cfg.resolution, max_frames=a.max_frames, head=a.head, test_frac=a.test_frac, landmarker=a.landmarker)
    out = Path(a.out)
    log = JsonlLog(out / "events.jsonl")
    try:
        with Progress() as prog:
            tasks: dict[str, int] = {}

            def cb(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = prog.add_task(f"preprocess: {stage}", total=total or None)
                prog.update(tasks[stage], completed=done, total=total or None)

            res = fit_video(a.video, out, cfg, _device(a.device), pcfg, progress=cb, bus_listeners=(log, RichProgress()))
    except (PreprocessError, MediaPipeMissing, TrainingStopped) as e:
        raise CliError(str(e)) from None
    finally:
        log.close()
    print(markdown_table({out.name: res}))
    print(f"wrote {out / 'eval.json'}, {out / 'eval_strip.png'} and {out / 'preview.mp4'}")


def cmd_demo(a: argparse.Namespace) -> None:
    """Synthetic subject -> quick training -> compact checkpoint (the bundled demo avatar)."""
    from hravatar.api import DEMO_CHECKPOINT
    from hravatar.data.synth import SynthConfig, generate_synthetic
    from hravatar.io.checkpoint import bake_identity, load_checkpoint, save_checkpoint
    from hravatar.train.config import profile_config
    from hravatar.train.events import JsonlLog, RichProgress
    from hravatar.train.trainer import Trainer

    work = Path(a.work)
    data = work / "synth"
    if not data.exists():
        generate_synthetic(data, SynthConfig(frames=a.frames, res=256, seed=a.seed))
    trainer = Trainer(data, work / "run", profile_config("quick"), device=_device(a.device))
    trainer.bus.subscribe(JsonlLog(work / "run" / "events.jsonl"))
    trainer.bus.subscribe(RichProgress())
    ck = trainer.run(resume=True)
    bundle = load_checkpoint(ck)
    bundle.avatar = bake_identity(bundle.avatar)
    out = Path(a.out) if a.out else DEMO_CHECKPOINT
    save_checkpoint(out, bundle, compact=True)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")


def build_parser() -> argparse.ArgumentParser:
    from hravatar.render.pipeline import CHANNELS

    p = argparse.ArgumentParser(prog="hravatar", description="Relightable, animatable Gaussian head avatars.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render an avatar to an image or a turntable video")
    r.add_argument("checkpoint", nargs="?", default=None, help="avatar checkpoint (default: the bundled demo avatar)")
    r.add_argument("--out", required=True, help="output .png/.jpg, or .mp4 for a turntable")
    r.add_argument("--envmap", default=None, help="builtin:NAME, learned, or a lat-long .hdr/.exr file (default: learned if present, else builtin:studio)")
    r.add_argument("--rotate", type=float, default=0.0, help="environment rotation about the vertical axis (degrees)")
    r.add_argument("--exposure", type=float, default=0.0, help="exposure in stops")
    r.add_argument("--expr", nargs="*", default=[], metavar="NAME=VALUE", help="expression values, e.g. jawOpen=0.5 mouthSmile_L=1")
    r.add_argument("--jaw", type=float, default=None, help="jaw opening angle (radians)")
    r.add_argument("--yaw", type=float, default=0.0, help="camera yaw around the head (degrees)")
    r.add_argument("--channel", default="shaded", choices=CHANNELS)
    r.add_argument("--res", type=int, default=512)
    r.add_argument("--device", default="auto", help="cpu, cuda or auto")
    r.add_argument("--backend", default="auto", choices=["auto", "torch", "numba", "gsplat"])
    r.add_argument("--rough-scale", type=float, default=1.0, help="roughness scale s_r")
    r.add_argument("--f0-edit", type=float, default=0.0, help="F0 edit s_f in [0,1]")
    r.add_argument("--tint", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="albedo tint RGB")
    r.add_argument("--background", type=float, nargs=3, default=(1.0, 1.0, 1.0), help="background RGB in [0,1]")
    r.add_argument("--turntable", choices=["light", "head"], default="light", help="what an .mp4 turns")
    r.add_argument("--frames", type=int, default=72, help="frames of an .mp4 turntable")
    r.add_argument("--fps", type=int, default=24)
    r.set_defaults(func=cmd_render)

    i = sub.add_parser("info", help="print what a checkpoint holds")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="export a posed frame as a standard 3DGS .ply")
    e.add_argument("checkpoint", nargs="?", default=None)
    e.add_argument("--out", required=True, help="output .ply")
    e.add_argument("--envmap", default=None, help="lighting baked into the colours")
    e.add_argument("--expr", nargs="*", default=[], metavar="NAME=VALUE")
    e.add_argument("--jaw", type=float, default=None)
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="time deform / raster / shade and write JSON")
    b.add_argument("--device", default="auto")
    b.add_argument("--backend", default="auto", choices=["auto", "torch", "numba", "gsplat"])
    b.add_argument("--gaussians", type=int, nargs="+", default=[20000])
    b.add_argument("--res", type=int, nargs="+", default=[256])
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    b.add_argument("--compile", action="store_true", help="torch.compile deformation and shading (first frame compiles, not timed)")
    b.add_argument("--json", default=None, help="write results here")
    b.set_defaults(func=cmd_bench)

    sy = sub.add_parser("synth", help="render the synthetic ground-truth benchmark dataset")
    sy.add_argument("out_dir")
    sy.add_argument("--frames", type=int, default=300)
    sy.add_argument("--res", type=int, default=256)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--gaussians", type=int, default=120000, help="Gaussians of the ground-truth subject")
    sy.add_argument("--device", default="auto", help="where to render: cpu, cuda or auto")
    sy.set_defaults(func=cmd_synth)

    from hravatar.train.config import AvatarConfig, DensifySettings, LightConfig, LossConfig, LRConfig, TrainConfig
    from hravatar.utils.dataclass_cli import add_dataclass_arguments

    def train_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", choices=["quick", "full"], default="full", help="quick: CPU-friendly 256px; full: the method's schedule at 512px")
        sp.add_argument("--device", default="auto")
        add_dataclass_arguments(sp, TrainConfig, "", "training (overrides the profile)", overrides_only=True, skip=("profile",))
        for cls, (name, prefix) in zip((AvatarConfig, LightConfig, LossConfig, LRConfig, DensifySettings), _TRAIN_GROUPS):
            add_dataclass_arguments(sp, cls, prefix, f"{name} (overrides the profile)", overrides_only=True)

    t = sub.add_parser("train", help="train an avatar on a prepared dataset")
    t.add_argument("dataset")
    t.add_argument("--out", required=True, help="run folder (checkpoints, events.jsonl, previews)")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress display")
    t.add_argument("--stop-file", default=None, metavar="PATH",
                   help="stop cleanly (checkpoint, exit 0) once this file exists; SIGINT/SIGTERM do the same")
    train_options(t)
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a trained avatar on the test frames (or run the ablations)")
    ev.add_argument("target", help="run folder or checkpoint (with --ablations: the folder for the ablation runs)")
    ev.add_argument("--data", required=True, help="dataset folder")
    ev.add_argument("--json", default=None, help="write results here (plus .md table and _strip.png); default RUN_DIR/eval.json for a run folder")
    ev.add_argument("--max-frames", type=int, default=None, help="evaluate at most this many test frames")
    ev.add_argument("--ablations", action="store_true", help="train and evaluate the method's ablation switches")
    ev.add_argument("--retrain", action="store_true", help="with --ablations: retrain existing runs")
    train_options(ev)
    ev.set_defaults(func=cmd_eval)
    pp = sub.add_parser("preprocess", help="turn a head video into a dataset (crop, matting, tracking, QC video)")
    pp.add_argument("video", help="input video (any format ffmpeg reads)")
    pp.add_argument("--out", required=True, help="dataset folder to create")
    pp.add_argument("--res", type=int, default=512, help="side of the stored square frames")
    pp.add_argument("--max-frames", type=int, default=None, help="use at most this many frames from the start")
    pp.add_argument("--head", default="builtin", help="head model: builtin, flame:PATH or ict:DIR")
    pp.add_argument("--test-frac", type=float, default=0.2, help="fraction of frames (the last ones) held out for testing")
    pp.add_argument("--landmarker", default=None, metavar="PATH.task",
                    help="MediaPipe face_landmarker.task (default: the face mesh inside the mediapipe wheel)")
    pp.add_argument("--fps", type=float, default=None, help="dataset frame rate (default: the video's, at most 30)")
    pp.add_argument("--device", default="cpu", help="device of the head-model fitting: cpu, cuda or auto")
    pp.add_argument("--threads", type=int, default=1, help="torch CPU threads while fitting (0 = torch default; 1 is fastest on small or busy machines)")
    pp.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    pp.add_argument("--no-qc", action="store_true", help="skip the QC video (qc.json is always written)")
    pp.add_argument("--quiet", action="store_true", help="no progress display")
    pp.set_defaults(func=cmd_preprocess)
    fi = sub.add_parser("fit", help="video -> preprocess -> train -> eval -> preview, in one command (resumable)")
    fi.add_argument("video", help="input video (any format ffmpeg reads)")
    fi.add_argument("--out", required=True, help="run folder (dataset/, checkpoints, eval.json, preview.mp4)")
    fi.add_argument("--max-frames", type=int, default=None, help="use at most this many frames from the start")
    fi.add_argument("--head", default="builtin", help="head model: builtin, flame:PATH or ict:DIR")
    fi.add_argument("--test-frac", type=float, default=0.2, help="fraction of frames (the last ones) held out for testing")
    fi.add_argument("--landmarker", default=None, metavar="PATH.task", help="MediaPipe face_landmarker.task (optional)")
    train_options(fi)
    fi.set_defaults(func=cmd_fit)
    d = sub.add_parser("demo", help="rebuild the bundled demo avatar (synthetic subject, quick profile)")
    d.add_argument("--work", required=True, help="folder for the synthetic data and the training run (resumable)")
    d.add_argument("--out", default=None, help="output checkpoint (default: assets/demo_avatar.safetensors)")
    d.add_argument("--frames", type=int, default=300)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from hravatar.io.safe import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CliError, CheckpointError) as e:
        print(f"hravatar: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"hravatar: error: {e.filename}: file not found", file=sys.stderr)
        return 2
    except ValueError as e:  # expected bad input (envmap errors, bad expression names, ...)
        print(f"hravatar: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
