"""Training tab logic: run ``hravatar train`` in a separate process and follow its event stream.

The trainer knows nothing about the app: it appends JSON events to ``RUN_DIR/events.jsonl``
(see :mod:`hravatar.train.events`) and stops cleanly (checkpoint, exit 0) when ``RUN_DIR/.stop``
appears. :class:`TrainingJob` starts that process, asks it to pause/stop through the stop
file, tails the event file into a :class:`TrainingProgress` and turns the process's exit into
one of the states below. No GUI code here.

States: idle, running, pausing, paused, stopping, stopped, finished, failed.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STATES = ("idle", "running", "pausing", "paused", "stopping", "stopped", "finished", "failed")
ACTIVE_STATES = ("running", "pausing", "stopping")  # a training process is (or may be) alive
PROFILES = ("quick", "full")

EVENTS_FILE = "events.jsonl"
LOG_FILE = "train.log"
STOP_FILE = ".stop"
PID_FILE = "train.pid"
STATE_FILE = "state.safetensors"
CHECKPOINT_FILE = "avatar.safetensors"


def one_line(text: object, limit: int = 200) -> str:
    """``text`` squeezed to one line of at most ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def default_run_dir(dataset: str | Path) -> Path:
    """Where a run of ``dataset`` goes unless the user says otherwise: ``DATASET_run`` beside it."""
    d = Path(dataset).expanduser().resolve()
    return d.parent / f"{d.name}_run"


def check_dataset(path: str | Path | None) -> str | None:
    """None when ``path`` is a valid hravatar dataset folder, else a one-line reason."""
    if path is None or not str(path).strip():
        return "choose a dataset folder first"
    from hravatar.data.format import validate_dataset
    from hravatar.io.safe import CheckpointError

    try:
        validate_dataset(Path(path).expanduser())
    except (ValueError, CheckpointError, OSError) as e:  # DatasetError is a ValueError
        return one_line(e) or type(e).__name__
    return None


def log_reason(log_path: str | Path, max_bytes: int = 16384) -> str | None:
    """A one-line failure reason from the tail of a training log (None if nothing useful).

    Prefers the CLI's ``hravatar: error: ...`` line, then the last line of a Python traceback
    (``SomeError: message``), then the last non-empty line.
    """
    p = Path(log_path)
    try:
        with open(p, "rb") as f:
            f.seek(max(p.stat().st_size - max_bytes, 0))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return None
    if not lines:
        return None
    for ln in reversed(lines):
        if ln.startswith("hravatar: error:"):
            return one_line(ln[len("hravatar: error:"):])
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback"):
            return one_line(lines[-1])
    return one_line(lines[-1])


def format_eta(seconds: float | None) -> str:
    """``1h 02m``, ``3m 05s``, ``42s``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


# --------------------------------------------------------------------------- progress model
@dataclass
class Series:
    """One plotted curve: y values against iteration numbers."""

    xs: list[float] = field(default_factory=list)
    ys: list[float] = field(default_factory=list)

    def append(self, x: float, y: float) -> None:
        self.xs.append(float(x))
        self.ys.append(float(y))

    def truncate(self, x: float) -> None:
        """Drop points after iteration ``x`` (a resumed run restarts from its last checkpoint)."""
        n = len(self.xs)
        while n and self.xs[n - 1] > x:
            n -= 1
        del self.xs[n:], self.ys[n:]

    def last(self) -> float | None:
        return self.ys[-1] if self.ys else None

    def __len__(self) -> int:
        return len(self.xs)


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class TrainingProgress:
    """Everything the training tab shows, folded from the event stream (:meth:`apply`)."""

    iteration: int = 0
    total: int = 0
    losses: dict[str, Series] = field(default_factory=dict)
    psnr: Series = field(default_factory=Series)
    gaussians: Series = field(default_factory=Series)
    its: float | None = None
    eta_s: float | None = None
    phase: str = ""  # "", "encoder pre-training", "training", "stopped", "finished", "error"
    pretrain: tuple[int, int] | None = None  # (iteration, total) of the encoder pre-training
    preview_path: Path | None = None
    checkpoint_path: Path | None = None
    error: str | None = None
    finished: bool = False
    stopped: bool = False
    profile: str | None = None
    device: str | None = None
    num_events: int = 0

    @property
    def fraction(self) -> float:
        """Share of the iterations done, in [0, 1]."""
        return min(max(self.iteration / self.total, 0.0), 1.0) if self.total > 0 else 0.0

    def begin_session(self) -> None:
        """Forget the outcome of an earlier process (a new one is about to start)."""
        self.finished = self.stopped = False
        self.error = None
        self.its = self.eta_s = None

    def apply(self, ev: dict, run_dir: Path | None = None) -> None:
        """Fold one event in; malformed or unknown events are ignored (the trainer may be newer)."""
        try:
            self._apply(ev, run_dir)
        except (KeyError, TypeError, ValueError, AttributeError):
            return
        self.num_events += 1

    def _apply(self, ev: dict, run_dir: Path | None) -> None:
        kind = ev["kind"]
        it = int(ev.get("iteration", self.iteration))
        if kind == "start":
            self.begin_session()
            self.iteration, self.total = it, int(ev.get("total", self.total))
            for s in (*self.losses.values(), self.psnr, self.gaussians):
                s.truncate(it)
            if ev.get("num_gaussians") is not None and not self.gaussians.xs[-1:] == [it]:
                self.gaussians.append(it, ev["num_gaussians"])
            self.profile = ev.get("profile", self.profile)
            self.device = ev.get("device", self.device)
            self.phase = "training"
            self.pretrain = None
        elif kind == "encoder_pretrain":
            self.pretrain = (it, int(ev.get("total", 0)))
            self.phase = "encoder pre-training"
        elif kind == "iter":
            self.iteration = it
            self.total = int(ev.get("total", self.total))
            for name, v in (ev.get("losses") or {}).items():
                f = _finite(v)
                if f is not None:
                    self.losses.setdefault(str(name), Series()).append(it, f)
            if ev.get("num_gaussians") is not None:
                self.gaussians.append(it, ev["num_gaussians"])
            self.its = _finite(ev.get("its"))
            self.eta_s = _finite(ev.get("eta_s"))
            self.phase = "training"
        elif kind == "eval":
            f = _finite(ev.get("psnr"))
            if f is not None:
                self.psnr.append(it, f)
        elif kind == "preview":
            self.preview_path = _resolve(ev["path"], run_dir, "previews")
        elif kind == "checkpoint":
            self.checkpoint_path = _resolve(ev["path"], run_dir)
        elif kind == "done":
            self.iteration = it
            self.finished, self.phase, self.eta_s = True, "finished", 0.0
            self.checkpoint_path = _resolve(ev["path"], run_dir)
        elif kind == "stopped":
            self.iteration = it
            self.stopped, self.phase = True, "stopped"
            self.checkpoint_path = _resolve(ev["path"], run_dir)
        elif kind == "error":
            self.error, self.phase = one_line(ev.get("message", "training stopped")), "error"


def _resolve(path: str, run_dir: Path | None, sub: str = "") -> Path:
    """An event's file path; falls back to the same name inside ``run_dir`` (the folder was moved)."""
    p = Path(path)
    if p.exists() or run_dir is None:
        return p
    alt = (run_dir / sub / p.name) if sub else (run_dir / p.name)
    return alt if alt.exists() else p


class EventTail:
    """Incremental reader of an ``events.jsonl`` (byte offset; a partial last line waits)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0

    def read(self) -> list[dict]:
        """Events appended since the last call (complete lines only)."""
        from hravatar.train.events import read_events

        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # replaced or truncated: read it again from the start
            self.offset = 0
        events, self.offset = read_events(self.path, self.offset)
        return [e for e in events if isinstance(e, dict) and "kind" in e]


# --------------------------------------------------------------------------- the job
def _package_root() -> Path:
    """Folder that holds the ``hravatar`` package (the repository root when not installed)."""
    import hravatar

    return Path(hravatar.__file__).resolve().parent.parent


def _pid_alive(pid: int, run_dir: Path) -> bool:
    """Whether ``pid`` is a live training process of ``run_dir`` (POSIX only; False elsewhere)."""
    if os.name != "posix" or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # guard against a recycled pid
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        return b"hravatar.cli.main" in args and str(run_dir).encode() in args
    return True


class TrainingJob:
    """One run folder and (at most) one training process for it.

    Args:
        dataset: dataset folder (validated before a start).
        run_dir: run folder; default :func:`default_run_dir` of ``dataset``.
        profile: "quick" or "full".
        overrides: extra ``hravatar train`` options, e.g. ``["--iterations", "200"]``.
        python: interpreter for the child process (default ``sys.executable``).
        niceness: added to the child's CPU niceness so the interface stays responsive (POSIX).

    Construction reads an existing run folder's events (plots of an earlier run) and re-attaches
    to a run that an earlier app session left running (``train.pid``).
    """

    def __init__(self, dataset: str | Path | None, run_dir: str | Path | None = None, profile: str = "quick",
                 overrides: list[str] | tuple[str, ...] = (), python: str | None = None, niceness: int = 5) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile '{profile}' (choose {' or '.join(PROFILES)})")
        if run_dir is None and dataset is None:
            raise ValueError("a dataset or a run folder is needed")
        self.dataset = Path(dataset).expanduser().resolve() if dataset is not None else None
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else default_run_dir(dataset)
        self.profile = profile
        self.overrides = list(overrides)
        self.python = python or sys.executable
        self.niceness = niceness
        self.progress = TrainingProgress()
        self.message = ""
        self._state = "idle"
        self._tail = EventTail(self.run_dir / EVENTS_FILE)
        self._proc: subprocess.Popen | None = None
        self._pid: int | None = None  # an attached process started by an earlier app session
        self._final = False  # the running stop request is a stop, not a pause
        self._poll_events()
        self._attach()
        if self._state == "idle":
            self._describe_earlier_run()

    # ---------------------------------------------------------------- queries
    @property
    def state(self) -> str:
        return self._state

    @property
    def active(self) -> bool:
        return self._state in ACTIVE_STATES

    @property
    def has_saved_state(self) -> bool:
        """The run folder holds a resumable training state."""
        return (self.run_dir / STATE_FILE).exists()

    @property
    def can_start(self) -> bool:
        return not self.active and not self.has_saved_state

    @property
    def can_resume(self) -> bool:
        return not self.active and self.has_saved_state and not self.progress.finished

    @property
    def can_pause(self) -> bool:
        return self._state == "running"

    @property
    def can_stop(self) -> bool:
        return self._state in ("running", "pausing")

    @property
    def checkpoint(self) -> Path | None:
        """The newest checkpoint of the run, if any."""
        p = self.run_dir / CHECKPOINT_FILE
        return p if p.exists() else None

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    def command(self, resume: bool) -> list[str]:
        """The child's command line."""
        cmd = [self.python, "-m", "hravatar.cli.main", "train", str(self.dataset), "--out", str(self.run_dir),
               "--profile", self.profile]
        if resume:
            cmd.append("--resume")
        return cmd + ["--stop-file", str(self.run_dir / STOP_FILE), "--quiet", *self.overrides]

    # ---------------------------------------------------------------- actions
    def start(self, resume: bool = False) -> bool:
        """Launch the training process; False (with :attr:`message` set) when it cannot start."""
        if self.active:
            self.message = f"training is already {self._state}"
            return False
        if self.dataset is None:
            return self._fail("choose a dataset folder first")
        if not resume and self.has_saved_state:
            self.message = f"{self.run_dir} already holds a run: resume it or choose another run folder"
            return False
        if resume and not self.has_saved_state:
            self.message = f"nothing to resume in {self.run_dir} (no {STATE_FILE})"
            return False
        reason = check_dataset(self.dataset)
        if reason is not None:
            return self._fail(reason)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._clear_stop()  # a stale request would stop the new process at once
            env = dict(os.environ)
            root = str(_package_root())
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            env["PYTHONUNBUFFERED"] = "1"  # the log shows errors as they happen
            cmd = self.command(resume)
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
                log.flush()
                # own session / process group: Ctrl+C in the app's terminal does not reach the
                # trainer, and a run the user keeps going survives the app
                kw = {"start_new_session": True} if os.name == "posix" else \
                    {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              env=env, **kw)
        except OSError as e:
            return self._fail(f"cannot start training: {one_line(e)}")
        self._renice(self._proc.pid)
        self._write_pid(self._proc.pid)
        self._pid = None
        self._final = False
        self.progress.begin_session()
        self._state = "running"
        self.message = f"training {'resumed' if resume else 'started'} (log: {self.log_path})"
        return True

    def resume(self) -> bool:
        """Continue from the run folder's last checkpoint."""
        return self.start(resume=True)

    def pause(self) -> None:
        """Ask the trainer to save a checkpoint and exit; the state becomes "paused" once it has."""
        if self._state != "running":
            return
        self._request_stop()
        self._final = False
        self._state = "pausing"
        self.message = "pausing: the trainer saves a checkpoint at its next iteration" + self._pretrain_note()

    def stop(self) -> None:
        """Like :meth:`pause` but final ("stopped"; the run can still be resumed later)."""
        if self._state == "paused":
            self._state, self.message = "stopped", "training stopped"
            return
        if self._state not in ("running", "pausing"):
            return
        self._request_stop()
        self._final = True
        self._state = "stopping"
        self.message = "stopping: the trainer saves a checkpoint at its next iteration" + self._pretrain_note()

    def poll(self) -> list[dict]:
        """Read new events, notice the process's exit; returns the new events (oldest first)."""
        events = self._poll_events()
        if not self.active:
            return events
        if self._proc is not None:
            rc = self._proc.poll()
            if rc is None:
                return events
        elif self._pid is not None and _pid_alive(self._pid, self.run_dir):
            return events
        else:
            rc = None  # an attached process: its exit code is not ours to read
        events += self._poll_events()  # whatever it wrote before exiting
        self._finish(rc)
        return events

    def wait(self, timeout: float, interval: float = 0.05) -> str:
        """Poll until no process is active or ``timeout`` seconds passed; returns the state."""
        end = time.monotonic() + timeout
        while self.active and time.monotonic() < end:
            self.poll()
            if self.active:
                time.sleep(interval)
        return self._state

    def close(self, keep_running: bool, wait_s: float = 3.0, force: bool = False) -> None:
        """App exit. ``keep_running``: leave the process training (a later session re-attaches
        through ``train.pid``). Otherwise request a stop and wait up to ``wait_s`` seconds; a
        process still busy then saves and exits on its own at its next iteration.

        ``force`` also sends SIGTERM: the same clean stop once training runs, but it aborts a
        process still setting up or pre-training its encoder at once (nothing saved yet).
        """
        if not self.active:
            return
        if keep_running:
            self.message = f"training continues in the background (log: {self.log_path})"
            self._proc = None  # forget it without killing; its pid file stays for re-attaching
            self._pid = None
            self._state = "idle"
            return
        self.stop()
        if force and self._proc is not None:
            try:
                self._proc.terminate()
            except OSError:
                pass  # already gone
        self.wait(wait_s)

    # ---------------------------------------------------------------- internals
    def _poll_events(self) -> list[dict]:
        events = self._tail.read()
        for ev in events:
            self.progress.apply(ev, self.run_dir)
        return events

    def _attach(self) -> None:
        try:
            pid = int((self.run_dir / PID_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        if _pid_alive(pid, self.run_dir):
            self._pid = pid
            self._final = (self.run_dir / STOP_FILE).exists()  # an exit requested by the earlier session
            self._state = "stopping" if self._final else "running"
            self.message = f"following a training run started earlier (pid {pid})"
        else:
            (self.run_dir / PID_FILE).unlink(missing_ok=True)

    def _describe_earlier_run(self) -> None:
        """State and message for a run folder left by an earlier session."""
        p = self.progress
        if p.finished:
            self._state, self.message = "finished", f"finished run: {p.checkpoint_path}"
        elif p.stopped and self.has_saved_state:
            self._state = "paused"
            self.message = f"paused at iteration {p.iteration}/{p.total}: resume to continue"
        elif p.error:
            self._state, self.message = "failed", f"earlier run failed: {p.error}"
        elif self.has_saved_state:
            self.message = f"interrupted run at iteration {p.iteration}/{p.total}: resume to continue"

    def _finish(self, rc: int | None) -> None:
        """The process is gone: decide the outcome from its exit code and events."""
        self._proc = None
        self._pid = None
        self._clear_stop()
        (self.run_dir / PID_FILE).unlink(missing_ok=True)
        p = self.progress
        ok = rc in (0, None)
        if ok and p.finished:
            self._state = "finished"
            self.message = f"training finished: {p.checkpoint_path}"
        elif ok and p.stopped:
            self._state = "stopped" if self._final else "paused"
            self.message = f"training {self._state} at iteration {p.iteration}/{p.total}; checkpoint {p.checkpoint_path}"
        else:
            if rc is not None and rc < 0:
                reason = f"training process killed by signal {-rc}"
            else:
                reason = p.error or log_reason(self.log_path) or \
                    (f"training process exited with code {rc}" if rc is not None else "training process ended early")
            p.error = one_line(reason)
            self._state = "failed"
            self.message = f"training failed: {p.error}"

    def _fail(self, reason: str) -> bool:
        self.progress.error = one_line(reason)
        self._state = "failed"
        self.message = self.progress.error
        return False

    def _request_stop(self) -> None:
        try:
            (self.run_dir / STOP_FILE).write_text("stop\n")
        except OSError as e:
            self.message = f"cannot write the stop file: {one_line(e)}"

    def _clear_stop(self) -> None:
        try:
            (self.run_dir / STOP_FILE).unlink(missing_ok=True)
        except OSError:
            pass

    def _pretrain_note(self) -> str:
        return " (after the encoder pre-training)" if self.progress.phase == "encoder pre-training" else ""

    def _write_pid(self, pid: int) -> None:
        try:
            (self.run_dir / PID_FILE).write_text(f"{pid}\n")
        except OSError:
            pass  # only needed to re-attach after the app exits

    def _renice(self, pid: int) -> None:
        if self.niceness <= 0 or not hasattr(os, "setpriority"):
            return
        try:
            cur = os.getpriority(os.PRIO_PROCESS, pid)
            os.setpriority(os.PRIO_PROCESS, pid, min(cur + self.niceness, 19))
        except OSError:
            pass  # not permitted: run at the app's priority


# --------------------------------------------------------------------------- helpers for the tab
def load_preview(path: str | Path, width: int, height: int) -> np.ndarray | None:
    """A preview PNG letterboxed into ``[height, width, 4]`` float32 RGBA in [0, 1] (None if unreadable).

    Scaled by nearest-neighbour sampling to fit while keeping its aspect ratio; the border is
    transparent black.
    """
    import imageio.v3 as iio

    try:
        img = np.asarray(iio.imread(Path(path)))
    except Exception:  # being written, deleted or corrupt: keep the previous preview
        return None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, -1)
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        return None
    img = img[..., :3].astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
    h, w = img.shape[:2]
    s = min(width / w, height / h)
    nw, nh = max(1, int(round(w * s))), max(1, int(round(h * s)))
    ys = np.minimum((np.arange(nh) + 0.5) / s, h - 1).astype(int)
    xs = np.minimum((np.arange(nw) + 0.5) / s, w - 1).astype(int)
    out = np.zeros((height, width, 4), np.float32)
    y0, x0 = (height - nh) // 2, (width - nw) // 2
    out[y0:y0 + nh, x0:x0 + nw, :3] = img[ys][:, xs]
    out[y0:y0 + nh, x0:x0 + nw, 3] = 1.0
    return out


def latest_preview(run_dir: str | Path) -> Path | None:
    """The newest ``previews/*.png`` of a run (names are zero-padded iteration numbers)."""
    files = sorted((Path(run_dir) / "previews").glob("*.png"))
    return files[-1] if files else None


def write_tiny_dataset(root: str | Path, frames: int = 5, res: int = 32, test_frames: int = 1) -> Path:
    """A minimal valid dataset for the built-in head (a coloured ellipse moving over black).

    For the tab's self-test and the tests: trains for a few iterations in seconds. Frames are
    [res, res, 3] images with [res, res] masks; parameters are neutral, the camera frames the head.
    """
    import torch

    from hravatar.data.format import DatasetMeta, write_dataset
    from hravatar.head import load_head_model
    from hravatar.render.camera import orbit_camera

    head = load_head_model("builtin")
    cam = orbit_camera(distance=0.61, target=(0.0, 0.056, 0.0), fov_y_deg=20.0, width=res, height=res)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / res

    def frame(t: int):
        cx = 0.5 + 0.08 * math.sin(t)
        mask = (((xx - cx) / 0.3) ** 2 + ((yy - 0.5) / 0.4) ** 2 <= 1.0).astype(np.float32)
        col = np.array([0.8, 0.55 + 0.05 * (t % 3), 0.45], np.float32)
        img = mask[..., None] * col * (0.7 + 0.3 * (1 - yy[..., None]))
        return img, mask

    meta = DatasetMeta(num_frames=frames, width=res, height=res, fps=25.0, test_frames=test_frames, head=head.identity(),
                       expr_dim=head.num_expr, shape_dim=head.num_shape, source="app self-test")
    params = {"beta": torch.zeros(head.num_shape), "K": cam.K, "viewmat": cam.viewmat[None].repeat(frames, 1, 1),
              "expr": torch.zeros(frames, head.num_expr), "pose": torch.zeros(frames, 5, 3),
              "eyelids": torch.zeros(frames, 2), "transl": torch.zeros(frames, 3)}
    return write_dataset(root, meta, (frame(t) for t in range(frames)), params)


# overrides that make a run finish in seconds on a CPU (self-test and tests)
TINY_OVERRIDES = ("--resolution", "32", "--no-encoder", "--avatar-num-gaussians", "300", "--densify-start", "100000",
                  "--albedo-warmup", "0", "--log-every", "1", "--eval-every", "1000", "--eval-frames", "1",
                  "--preview-every", "2", "--checkpoint-every", "1000")
