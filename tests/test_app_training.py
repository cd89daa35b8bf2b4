"""Training tab: event tailing into the progress model, the job's state machine around a real
`hravatar train` process (pause -> resume -> finish, SIGTERM, failures), the --stop-file option,
and the dearpygui panel against a fake AppContext."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from app.training import (
    TINY_OVERRIDES,
    EventTail,
    TrainingJob,
    TrainingProgress,
    check_dataset,
    default_run_dir,
    format_eta,
    load_preview,
    log_reason,
    write_tiny_dataset,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4 frames at 32x32 for the built-in head (trains at a few iterations per second)."""
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny", frames=4, res=32)


def _ev(kind, it, **kw):
    return {"kind": kind, "iteration": it, "time": 0.0, **kw}


def _iter(it, total=10, l1=0.5, n=1000):
    return _ev("iter", it, losses={"l1": l1, "total": 2 * l1}, lrs={"means": 1e-4}, num_gaussians=n, its=2.0,
               eta_s=(total - it) / 2.0, total=total)


# ---------------------------------------------------------------------------- event parsing
def test_progress_from_events_appended_in_chunks(tmp_path):
    run = tmp_path / "run"
    (run / "previews").mkdir(parents=True)
    (run / "previews" / "000004.png").write_bytes(b"x")
    events = [_ev("start", 0, total=10, num_gaussians=1000, resumed=False, device="cpu", profile="quick"),
              _ev("encoder_pretrain", 20, loss=0.3, total=300),
              _iter(2, l1=0.4), _iter(4, l1=0.3, n=1200),
              _ev("eval", 4, psnr=21.5),
              _ev("preview", 4, path="/moved/elsewhere/previews/000004.png"),  # run folder was moved
              _ev("checkpoint", 4, path=str(run / "avatar.safetensors")),
              _iter(6, l1=0.2, n=1300)]
    data = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    path = run / "events.jsonl"
    tail, prog = EventTail(path), TrainingProgress()
    assert tail.read() == []  # no file yet
    seen = []
    # append in awkward chunks: the partial last line must wait for its newline
    cuts = [0, 17, 200, 201, len(data) - 5, len(data)]
    for a, b in zip(cuts, cuts[1:]):
        with open(path, "ab") as f:
            f.write(data[a:b])
        new = tail.read()
        assert tail.offset == data[:b].rfind(b"\n") + 1
        for e in new:
            prog.apply(e, run)
        seen += new
    assert [e["kind"] for e in seen] == [e["kind"] for e in events]
    assert (prog.iteration, prog.total) == (6, 10) and prog.fraction == pytest.approx(0.6)
    assert prog.losses["l1"].xs == [2, 4, 6] and prog.losses["l1"].ys == pytest.approx([0.4, 0.3, 0.2])
    assert prog.losses["total"].ys == pytest.approx([0.8, 0.6, 0.4])
    assert prog.psnr.xs == [4] and prog.psnr.ys == [21.5]
    assert prog.gaussians.xs == [0, 2, 4, 6] and prog.gaussians.ys == [1000, 1000, 1200, 1300]
    assert prog.its == 2.0 and prog.eta_s == pytest.approx(2.0)
    assert prog.pretrain == (20, 300) and prog.phase == "training"
    assert prog.preview_path == run / "previews" / "000004.png"  # resolved inside the run folder
    assert prog.checkpoint_path == run / "avatar.safetensors"
    assert not prog.finished and prog.error is None

    # a resumed process restarts at its checkpoint (4): later points are replaced, not duplicated
    more = [_ev("stopped", 6, path=str(run / "avatar.safetensors")),
            _ev("start", 4, total=10, num_gaussians=1200, resumed=True, device="cpu", profile="quick"),
            {"kind": "iter", "iteration": "bad"},  # malformed: ignored
            _iter(6, l1=0.25, n=1250), _iter(10, l1=0.1, n=1400),
            _ev("eval", 10, psnr=float("nan")),  # not finite: not plotted
            _ev("done", 10, path=str(run / "avatar.safetensors"))]
    with open(path, "ab") as f:
        f.write(b"".join(json.dumps(e).encode() + b"\n" for e in more) + b"garbage line\n")
    for e in tail.read():
        prog.apply(e, run)
    assert prog.losses["l1"].xs == [2, 4, 6, 10] and prog.losses["l1"].ys == pytest.approx([0.4, 0.3, 0.25, 0.1])
    assert prog.gaussians.xs == [0, 2, 4, 6, 10] and prog.gaussians.ys[-2:] == [1250, 1400]
    assert prog.psnr.ys == [21.5]
    assert prog.finished and not prog.stopped and prog.iteration == 10 and prog.phase == "finished"

    # an error event gives a one-line message
    prog.apply(_ev("error", 7, message="loss became nan\nat iteration 7"))
    assert prog.error == "loss became nan at iteration 7"
    # a replaced (shorter) file is read again from the start
    path.write_bytes(json.dumps(_iter(1)).encode() + b"\n")
    assert [e["iteration"] for e in tail.read()] == [1]


def test_helpers_eta_log_reason_and_preview(tmp_path):
    assert format_eta(None) == "-" and format_eta(float("inf")) == "-"
    assert format_eta(42.4) == "42s" and format_eta(185) == "3m 05s" and format_eta(3720) == "1h 02m"
    log = tmp_path / "train.log"
    assert log_reason(log) is None
    log.write_text("=== start\nsome output\nhravatar: error: /d/params.safetensors: missing\nwrote x\n")
    assert log_reason(log) == "/d/params.safetensors: missing"
    log.write_text("=== start\nTraceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: out of   memory\n")
    assert log_reason(log) == "RuntimeError: out of memory"
    assert default_run_dir(tmp_path / "ds") == tmp_path.resolve() / "ds_run"

    # letterboxing: a 4x8 image into 16x16 is scaled by exactly 2 (nearest), centred vertically
    import imageio.v3 as iio

    img = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3) * 2
    iio.imwrite(tmp_path / "p.png", img)
    out = load_preview(tmp_path / "p.png", 16, 16)
    assert out.shape == (16, 16, 4)
    expected = np.repeat(np.repeat(img, 2, 0), 2, 1) / 255.0
    assert np.allclose(out[4:12, :, :3], expected) and (out[4:12, :, 3] == 1).all()
    assert (out[:4] == 0).all() and (out[12:] == 0).all()
    assert load_preview(tmp_path / "missing.png", 16, 16) is None


# ---------------------------------------------------------------------------- the job
def test_bad_dataset_gives_one_line_message(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dataset.json").write_text("{ not json")
    for ds in (bad, tmp_path / "missing"):
        job = TrainingJob(ds, tmp_path / "run", "quick")
        assert job.state == "idle" and job.can_start
        assert not job.start()
        assert job.state == "failed" and job.progress.error == job.message
        assert "\n" not in job.message and str(ds) in job.message and "Traceback" not in job.message
        assert not (tmp_path / "run" / "train.log").exists()  # no process was started
    assert check_dataset(None) == "choose a dataset folder first"
    with pytest.raises(ValueError):
        TrainingJob(bad, tmp_path / "run", "slow")


class _ScriptJob(TrainingJob):
    """A job whose child is a small Python script instead of the trainer (fast state-machine tests)."""

    script = ""

    def command(self, resume):
        return [self.python, "-c", self.script, str(self.run_dir), str(self.run_dir / ".stop")]


def test_process_failure_reason_and_refusals(tiny_data, tmp_path):
    job = _ScriptJob(tiny_data, tmp_path / "run", "quick")
    job.script = "import sys\nprint('loading...')\nprint('hravatar: error: the GPU caught fire', file=sys.stderr)\nsys.exit(2)"
    assert job.start() and job.state == "running" and not job.can_start
    assert not job.start()  # already running
    assert job.wait(20) == "failed"
    assert job.message == "training failed: the GPU caught fire" and job.progress.error == "the GPU caught fire"
    assert not (tmp_path / "run" / "train.pid").exists()

    # a run folder with a saved state is resumed, never overwritten by a fresh start
    (tmp_path / "run" / "state.safetensors").write_bytes(b"x")
    assert not job.can_start and job.can_resume
    assert not job.start() and "resume" in job.message
    empty = TrainingJob(tiny_data, tmp_path / "other", "quick")
    assert not empty.resume() and "nothing to resume" in empty.message

    # killed by a signal
    job.script = "import time\ntime.sleep(30)"
    assert job.resume()
    job._proc.kill()
    assert job.wait(20) == "failed" and "signal" in job.message


def test_earlier_run_folder_is_detected(tmp_path):
    run = tmp_path / "ds_run"
    run.mkdir()
    evs = [_ev("start", 0, total=10, num_gaussians=5, profile="full", device="cpu"), _iter(2), _iter(4),
           _ev("stopped", 4, path=str(run / "avatar.safetensors"))]
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
    (run / "state.safetensors").write_bytes(b"x")
    (run / "avatar.safetensors").write_bytes(b"x")
    (run / "train.pid").write_text(f"{os.getpid()}\n")  # a live pid, but not a trainer of this run
    job = TrainingJob(tmp_path / "ds", None, "quick")
    assert job.run_dir == run.resolve()
    assert job.state == "paused" and job.can_resume and not job.can_start and job.checkpoint == run / "avatar.safetensors"
    assert job.progress.iteration == 4 and job.progress.profile == "full" and len(job.progress.losses["l1"]) == 2
    assert not (run / "train.pid").exists()  # stale pid file removed, nothing attached


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="re-attaching checks /proc")
def test_reattach_to_a_run_left_running(tmp_path):
    """An app session that kept its run going: the next session follows it and can stop it."""
    run = (tmp_path / "run").resolve()
    run.mkdir()
    # stands in for `python -m hravatar.cli.main train ... --out RUN` (same markers on its command line)
    code = ("import json, os, sys, time\n"
            "run = sys.argv[2]\n"
            "while not os.path.exists(run + '/.stop'): time.sleep(0.02)\n"
            "open(run + '/events.jsonl', 'a').write(json.dumps(dict(kind='stopped', iteration=3, time=0.0, "
            "path=run + '/avatar.safetensors')) + '\\n')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, "hravatar.cli.main", str(run)])
    try:
        # Popen can return while the child is still inside exec (vfork), before the kernel shows
        # its new command line; a session re-attaching later never sees that window.
        cmdline = Path(f"/proc/{proc.pid}/cmdline")
        assert _wait_for(lambda: b"hravatar.cli.main" in cmdline.read_bytes(), 10)
        evs = [_ev("start", 0, total=10, num_gaussians=5), _iter(3)]
        (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evs))
        (run / "train.pid").write_text(f"{proc.pid}\n")
        job = TrainingJob(None, run, "quick")
        assert job.state == "running" and job.progress.iteration == 3 and "following" in job.message
        assert job.poll() == [] and job.state == "running"
        job.stop()
        assert job.state == "stopping" and job.wait(20) == "stopped"
        assert job.progress.stopped and not (run / "train.pid").exists() and not (run / ".stop").exists()
    finally:
        proc.kill()
        proc.wait()


def _wait_for(pred, timeout, job=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if job is not None:
            job.poll()
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_pause_then_resume_to_completion(tiny_data, tmp_path):
    """Real `hravatar train` child: pause through the stop file, resume, finish."""
    total = 5
    job = TrainingJob(tiny_data, tmp_path / "run", "quick", overrides=["--iterations", str(total), *TINY_OVERRIDES])
    assert job.start() and job.state == "running"
    assert _wait_for(lambda: job.progress.iteration >= 1, 60, job), job.message
    job.pause()
    assert job.state == "pausing" and (job.run_dir / ".stop").exists() and not job.can_pause and job.can_stop
    assert job.wait(60) == "paused", job.message
    stopped_at = job.progress.iteration
    assert 1 <= stopped_at < total and job.progress.stopped and not job.progress.finished
    assert job.has_saved_state and job.can_resume and not (job.run_dir / ".stop").exists()
    assert "stopped at iteration" in job.log_path.read_text()  # clean exit of the CLI, not a kill

    assert job.resume() and job.state == "running"
    assert job.wait(90) == "finished", job.message
    p = job.progress
    assert p.finished and p.iteration == total and p.total == total and p.error is None
    assert p.losses["total"].xs[-1] == total and len(p.losses["total"]) == total  # log every iteration, no duplicates
    assert sorted(set(p.losses["total"].xs)) == p.losses["total"].xs
    assert p.psnr.xs == [total] and np.isfinite(p.psnr.ys[0])
    assert p.preview_path is not None and p.preview_path.exists() and p.checkpoint_path == job.checkpoint
    assert len(p.gaussians) > 0 and p.gaussians.ys[-1] == 300

    from hravatar.io.checkpoint import load_checkpoint

    assert load_checkpoint(job.checkpoint).meta["train"]["iteration"] == total


@pytest.mark.skipif(os.name != "posix", reason="SIGTERM to a child is POSIX-only")
def test_cli_sigterm_stops_cleanly(tiny_data, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "hravatar.cli.main", "train", str(tiny_data), "--out", str(run),
                             "--profile", "quick", "--quiet", "--iterations", "200", *TINY_OVERRIDES],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    tail = EventTail(run / "events.jsonl")
    seen = []
    assert _wait_for(lambda: seen.extend(tail.read()) or any(e["kind"] == "iter" for e in seen), 60)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    seen += tail.read()
    stopped = [e for e in seen if e["kind"] == "stopped"]
    assert len(stopped) == 1 and 1 <= stopped[0]["iteration"] < 200
    assert "stopped at iteration" in out and "Traceback" not in err
    assert (run / "state.safetensors").exists() and (run / "avatar.safetensors").exists()


# ---------------------------------------------------------------------------- the panel
class FakeCtx:
    """The parts of app.context.AppContext the Train tab uses."""

    def __init__(self):
        self.callbacks, self.opened, self.notes = [], [], []

    def add_frame_callback(self, fn):
        self.callbacks.append(fn)

    def open_checkpoint(self, path):
        self.opened.append(Path(path))

    def notify(self, message, level="info"):
        assert "\n" not in message
        self.notes.append((level, message))

    def tick(self, dt=0.3):
        for fn in self.callbacks:
            fn(dt)


# a stand-in trainer: the same files and events as `hravatar train`, in a fraction of a second
_FAKE_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    import numpy as np, imageio.v3 as iio
    run, stop = sys.argv[1], sys.argv[2]
    os.makedirs(run + "/previews", exist_ok=True)
    f = open(run + "/events.jsonl", "a")
    def emit(kind, it, **kw):
        f.write(json.dumps(dict(kind=kind, iteration=it, time=time.time(), **kw)) + "\\n"); f.flush()
    ck = run + "/avatar.safetensors"
    emit("start", 0, total=6, num_gaussians=100, profile="quick", device="cpu")
    for it in range(1, 7):
        if os.path.exists(stop):
            open(ck, "wb").write(b"ck"); open(run + "/state.safetensors", "wb").write(b"st")
            emit("stopped", it - 1, path=ck); sys.exit(0)
        emit("iter", it, losses=dict(l1=1.0 / it, total=2.0 / it), lrs={}, num_gaussians=100 + it, its=5.0,
             eta_s=(6 - it) / 5.0, total=6)
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.01")))
    iio.imwrite(run + "/previews/000006.png", np.full((8, 16, 3), 200, np.uint8))
    emit("preview", 6, path=run + "/previews/000006.png")
    emit("eval", 6, psnr=25.0)
    open(ck, "wb").write(b"ck"); open(run + "/state.safetensors", "wb").write(b"st")
    emit("done", 6, path=ck)
""")


def test_panel_runs_a_job_and_opens_the_result(tiny_data, monkeypatch):
    dpg = pytest.importorskip("dearpygui.dearpygui")
    from app.ui.train_panel import build

    monkeypatch.setattr(TrainingJob, "command",
                        lambda self, resume: [self.python, "-c", _FAKE_TRAINER, str(self.run_dir), str(self.run_dir / ".stop")])
    dpg.create_context()
    try:
        with dpg.window():
            with dpg.tab_bar():
                with dpg.tab(label="Train") as tab:
                    ctx = FakeCtx()
                    panel = build(tab, ctx)
        assert len(ctx.callbacks) == 1
        enabled = lambda k: dpg.get_item_configuration(panel._buttons[k])["enabled"]  # noqa: E731
        assert not enabled("start") and not enabled("open")
        panel.set_dataset(str(tiny_data))
        run = default_run_dir(tiny_data)
        assert panel.run_dir == str(run) and dpg.get_value(panel._run_in) == str(run)
        assert enabled("start") and not enabled("pause") and not enabled("resume") and not enabled("stop")
        assert "valid" in dpg.get_value(panel._msg)

        assert panel.start() and panel.training_active
        assert enabled("pause") and enabled("stop") and not enabled("start")
        assert _wait_for(lambda: ctx.tick() or panel.job.state == "finished", 30)
        assert ctx.opened == [run / "avatar.safetensors"]  # the result opened in the viewport
        assert not panel.training_active and not enabled("stop") and enabled("open") and not enabled("start")
        xs, ys = dpg.get_value(panel._series["l1"])[:2]
        assert list(xs) == [1, 2, 3, 4, 5, 6] and np.allclose(ys, [1 / i for i in range(1, 7)])
        assert list(dpg.get_value(panel._psnr_series)[1]) == [25.0]
        assert list(dpg.get_value(panel._gauss_series)[1])[-1] == 106
        assert "5.00 it/s" in panel.stats_text() and "25.00 dB" in panel.stats_text()
        tex = np.asarray(dpg.get_value(panel._tex)).reshape(-1, 4)
        assert tex[:, :3].max() == pytest.approx(200 / 255, abs=1e-6)  # the preview PNG reached the texture
        assert tex[:, 3].min() == 1  # a 2:1 preview fills the 2:1 texture
        assert panel.open_latest() and len(ctx.opened) == 2

        # a second run folder: pause -> paused (nothing opened), resume -> finished, stop -> final
        monkeypatch.setenv("FAKE_STEP_S", "0.5")
        panel.set_run_dir(str(run) + "2")
        assert enabled("start") and not panel._series and list(dpg.get_value(panel._psnr_series)[0]) == []
        assert panel.start()
        panel.pause()
        assert panel.job.state == "pausing" and not enabled("pause") and enabled("stop")
        assert _wait_for(lambda: ctx.tick() or panel.job.state == "paused", 30)
        assert len(ctx.opened) == 2 and enabled("resume") and not enabled("start")
        monkeypatch.setenv("FAKE_STEP_S", "0.01")
        assert panel.resume()
        assert _wait_for(lambda: ctx.tick() or panel.job.state == "finished", 30)
        assert len(ctx.opened) == 3

        # a bad dataset: one-line warning in the message line and the status bar
        panel.set_dataset(str(tiny_data.parent))
        assert ctx.notes and ctx.notes[-1][0] == "warning" and str(tiny_data.parent) in ctx.notes[-1][1]
        panel.close()
    finally:
        dpg.destroy_context()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="re-attaching checks /proc")
def test_panel_close_keeps_the_run_and_selftest_opens_nothing(tiny_data, tmp_path, monkeypatch):
    """App exit with "keep it running": the run survives and a later panel follows and stops it;
    the self-test's tiny result never opens in the viewport, and the user's choice comes back."""
    dpg = pytest.importorskip("dearpygui.dearpygui")
    from app.ui.train_panel import build

    # the fake trainer with the markers a real one has on its command line (re-attaching checks them)
    monkeypatch.setattr(TrainingJob, "command", lambda self, resume: [
        self.python, "-c", _FAKE_TRAINER, str(self.run_dir), str(self.run_dir / ".stop"), "hravatar.cli.main"])
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    dpg.create_context()
    proc_pid = None
    try:
        with dpg.window():
            with dpg.tab_bar():
                with dpg.tab(label="Train") as tab:
                    ctx = FakeCtx()
                    panel = build(tab, ctx)
                with dpg.tab(label="Train 2") as tab2:
                    later = build(tab2, ctx)
        assert not panel.show_run(tmp_path / "missing") and ctx.notes[-1][0] == "warning"
        run = tmp_path / "run"
        panel.set_dataset(str(tiny_data))
        panel.set_run_dir(str(run))
        assert panel.start() and panel.training_active
        proc_pid = int((run / "train.pid").read_text().split()[0])
        assert _wait_for(lambda: (run / "events.jsonl").exists(), 30)  # the trainer is up (not just forked)
        panel.close(keep_running=True)
        assert not panel.training_active
        os.kill(proc_pid, 0)  # still training
        # the next session points its Train tab at the folder: it follows the run and can stop it
        assert later.show_run(run, dataset=tiny_data) and later.training_active
        assert later.job.state == "running" and "following" in later.job.message
        later.stop()
        assert _wait_for(lambda: ctx.tick() or later.job.state == "stopped", 30)
        assert later.job.checkpoint is not None and later.job.can_resume

        # the self-test: a short run, paused and stopped; its result is not opened, auto-open comes back
        opened = len(ctx.opened)
        later.set_options("--iterations 7")
        later.selftest()
        assert not later.auto_open and not dpg.get_value(later._auto_box)
        assert later.options == "--iterations 7" and dpg.get_value(later._options_in) == "--iterations 7"
        assert _wait_for(lambda: ctx.tick() or not later.training_active, 30)
        ctx.tick()
        assert len(ctx.opened) == opened and later.job.state in ("stopped", "finished")
        assert later.auto_open and dpg.get_value(later._auto_box)
        selftest_dir = later._selftest_dir
        later.close()
        assert selftest_dir is not None and not selftest_dir.exists()
    finally:
        if proc_pid is not None:
            try:
                os.kill(proc_pid, signal.SIGKILL)
            except OSError:
                pass
        dpg.destroy_context()
