"""Train tab: pick a dataset and run folder, start / pause / resume / stop a training process,
plot its losses, PSNR and Gaussian count, show its latest preview, open its checkpoint.
Thin dearpygui layer over :class:`app.training.TrainingJob`."""
from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from pathlib import Path

import dearpygui.dearpygui as dpg
import numpy as np

from app.training import (
    PROFILES,
    TINY_OVERRIDES,
    TrainingJob,
    check_dataset,
    default_run_dir,
    format_eta,
    latest_preview,
    load_preview,
    one_line,
    write_tiny_dataset,
)

from . import MUTED, form, heading, row

_POLL_S = 0.25  # poll the run folder at 4 Hz: fresh enough, and cheap for the UI thread
_PREVIEW_W, _PREVIEW_H = 368, 184  # previews are ground truth | render side by side (2:1); fits the side bar
_LABEL_W = 78  # label column of the form rows
_HALF_W = 216  # PSNR and Gaussian plots side by side in the ~430 px wide side bar
_WRAP = 425
_STATS_COLOUR = (190, 196, 206)
_OPEN_ON = ("finished", "stopped")  # outcomes whose checkpoint opens in the viewport


class TrainPanel:
    """The widgets of the Train tab and their callbacks (see :func:`build`)."""

    def __init__(self, parent, ctx) -> None:
        self.ctx = ctx
        self.job: TrainingJob | None = None
        self.dataset = ""
        self.run_dir = ""
        self.profile = "quick"
        self.options = ""  # extra `hravatar train` options, shell syntax
        self.auto_open = True
        self._since_poll = _POLL_S
        self._last_state = ""
        self._shown_preview: Path | None = None
        self._series: dict[str, int | str] = {}
        self._shown_counts: tuple = ()
        self._selftest_dir: Path | None = None
        self._auto_open_after_selftest: bool | None = None  # restored once the self-test's run has ended
        self._build(parent)
        ctx.add_frame_callback(self._on_frame)

    # ---------------------------------------------------------------- layout
    def _build(self, parent) -> None:
        shell = getattr(self.ctx, "shell", None)
        fonts = getattr(shell, "fonts", None)
        with dpg.group(parent=parent) as self.root:
            t = form(label_width=_LABEL_W)
            with dpg.group(horizontal=True, parent=row(t, "Dataset", "A prepared dataset folder "
                                                           "(hravatar preprocess / hravatar synth).")):
                self._dataset_in = dpg.add_input_text(width=-78, on_enter=True, hint="prepared dataset folder",
                                                      callback=lambda s, a: self.set_dataset(a))
                self._dataset_btn = dpg.add_button(label="Browse", width=70,
                                                   callback=lambda: dpg.show_item(self._dataset_dialog))
            with dpg.group(horizontal=True, parent=row(t, "Run folder", "Checkpoints, events and previews go here; "
                                                              "choose a folder of an earlier run to follow or resume it.")):
                self._run_in = dpg.add_input_text(width=-78, on_enter=True, hint="where the run is saved",
                                                  callback=lambda s, a: self.set_run_dir(a))
                self._run_btn = dpg.add_button(label="Browse", width=70, callback=lambda: dpg.show_item(self._run_dialog))
            with dpg.group(horizontal=True, parent=row(t, "Profile", "quick: CPU-friendly 256x256; full: the method's "
                                                           "schedule at 512x512 for a GPU. Extra options are passed to "
                                                           "hravatar train.")):
                self._profile_in = dpg.add_combo(list(PROFILES), default_value=self.profile, width=80,
                                                 callback=lambda s, a: self.set_profile(a))
                self._options_in = dpg.add_input_text(width=-1, hint="extra options, e.g. --iterations 500",
                                                      callback=lambda s, a: self.set_options(a))
            for item in (self._dataset_in, self._run_in, self._options_in):
                if shell is not None and hasattr(shell, "register_text_input"):
                    shell.register_text_input(item)  # typing "r" / "f" there must not move the camera
            self._auto_box = dpg.add_checkbox(label="Open the result in the viewport when training ends", default_value=True,
                                              callback=lambda s, a: setattr(self, "auto_open", bool(a)))
            with dpg.group(horizontal=True):
                self._buttons = {
                    "start": dpg.add_button(label="Start", width=64, callback=lambda: self.start()),
                    "pause": dpg.add_button(label="Pause", width=64, callback=lambda: self.pause()),
                    "resume": dpg.add_button(label="Resume", width=70, callback=lambda: self.resume()),
                    "stop": dpg.add_button(label="Stop", width=64, callback=lambda: self.stop()),
                    "open": dpg.add_button(label="Open result", width=-1, callback=lambda: self.open_latest()),
                }
            self._bar = dpg.add_progress_bar(default_value=0.0, overlay="", width=-1)
            self._stats = dpg.add_text("", color=_STATS_COLOUR)
            self._msg = dpg.add_text("Choose a prepared dataset folder (hravatar preprocess / hravatar synth).",
                                     wrap=_WRAP, color=MUTED)
            dpg.add_spacer(height=2)
            heading("Latest preview (ground truth | render)", fonts=fonts)
            with dpg.texture_registry():
                self._tex = dpg.add_dynamic_texture(_PREVIEW_W, _PREVIEW_H, np.zeros(_PREVIEW_W * _PREVIEW_H * 4, np.float32))
            self._preview = dpg.add_image(self._tex, width=_PREVIEW_W, height=_PREVIEW_H, border_color=(60, 64, 72, 255),
                                          show=False)
            self._no_preview = dpg.add_text("No preview yet: the trainer writes one every few hundred iterations.",
                                            color=MUTED, wrap=_WRAP)
            dpg.add_spacer(height=2)
            self._no_data = dpg.add_text("The plots fill in as the run writes its events.", color=MUTED)
            with dpg.group(show=False) as self._plot_group:
                loss_plot, self._loss_y = self._plot("Losses", height=140, log=True, legend=True)
                with dpg.group(horizontal=True):
                    psnr_plot, self._psnr_y = self._plot("Test PSNR (dB)", height=110, width=_HALF_W)
                    gauss_plot, self._gauss_y = self._plot("Gaussians", height=110, width=-1)
                self._plots = (loss_plot, psnr_plot, gauss_plot)
                self._psnr_series = dpg.add_line_series([], [], label="PSNR", parent=self._psnr_y)
                self._gauss_series = dpg.add_line_series([], [], label="Gaussians", parent=self._gauss_y)
        # dearpygui draws disabled buttons like enabled ones unless a theme says otherwise
        with dpg.theme() as self._disabled_theme:
            with dpg.theme_component(dpg.mvButton, enabled_state=False):
                dpg.add_theme_color(dpg.mvThemeCol_Text, (120, 120, 120))
                dpg.add_theme_color(dpg.mvThemeCol_Button, (40, 40, 44))
                dpg.add_theme_color(dpg.mvThemeCol_ButtonHovered, (40, 40, 44))
                dpg.add_theme_color(dpg.mvThemeCol_ButtonActive, (40, 40, 44))
        for b in (*self._buttons.values(), self._dataset_btn, self._run_btn):
            dpg.bind_item_theme(b, self._disabled_theme)
        # auto-fit with a margin so flat curves stay off the frame (linear axes only: a padded
        # log axis would reach down to zero); small plot paddings so the plots fit the side bar
        with dpg.theme() as self._plot_theme:
            with dpg.theme_component(dpg.mvPlot):
                dpg.add_theme_style(dpg.mvPlotStyleVar_FitPadding, 0.02, 0.1, category=dpg.mvThemeCat_Plots)
                dpg.add_theme_style(dpg.mvPlotStyleVar_PlotPadding, 6, 6, category=dpg.mvThemeCat_Plots)
        with dpg.theme() as self._log_plot_theme:
            with dpg.theme_component(dpg.mvPlot):
                dpg.add_theme_style(dpg.mvPlotStyleVar_PlotPadding, 6, 6, category=dpg.mvThemeCat_Plots)
        dpg.bind_item_theme(self._plots[0], self._log_plot_theme)
        for plot in self._plots[1:]:
            dpg.bind_item_theme(plot, self._plot_theme)
        self._dataset_dialog = self._dir_dialog(lambda p: self.set_dataset(p))
        self._run_dialog = self._dir_dialog(lambda p: self.set_run_dir(p))
        self._refresh()

    @staticmethod
    def _plot(title: str, height: int, width: int = -1, log: bool = False, legend: bool = False):
        with dpg.plot(label=title, height=height, width=width, no_menus=True) as plot:
            if legend:  # outside, so it never hides the curves
                dpg.add_plot_legend(outside=True, location=dpg.mvPlot_Location_East)
            dpg.add_plot_axis(dpg.mvXAxis, auto_fit=True)  # x: training iteration
            y = dpg.add_plot_axis(dpg.mvYAxis, auto_fit=True, scale=dpg.mvPlotScale_Log10 if log else dpg.mvPlotScale_Linear)
        return plot, y

    @staticmethod
    def _dir_dialog(on_pick):
        def cb(sender, app_data):
            app_data = app_data or {}
            path = app_data.get("file_path_name") or app_data.get("current_path")
            if path:
                on_pick(path)
        return dpg.add_file_dialog(show=False, callback=cb, width=600, height=400, directory_selector=True,
                                   default_path=str(Path.home()))

    # ---------------------------------------------------------------- actions (callbacks call these)
    @property
    def training_active(self) -> bool:
        """A training process is running (the shell asks whether to keep it before exiting)."""
        return self.job is not None and self.job.active

    def set_dataset(self, path: str) -> None:
        """Choose the dataset folder; the run folder follows it while the user has not set one."""
        if self.training_active:
            return self._say("stop the running training before choosing another dataset", "warning")
        path = str(path).strip()
        old_default = str(default_run_dir(self.dataset)) if self.dataset else ""
        self.dataset = path
        dpg.set_value(self._dataset_in, path)
        if path and (not self.run_dir or self.run_dir == old_default):
            self.run_dir = str(default_run_dir(path))
            dpg.set_value(self._run_in, self.run_dir)
        reason = check_dataset(path)
        self._new_job()
        if reason:
            self._say(reason, "warning")
        else:
            self._say(f"dataset {path} is valid" + (f"; {self.job.message}" if self.job and self.job.message else ""))

    def set_run_dir(self, path: str) -> None:
        if self.training_active:
            return self._say("stop the running training before choosing another run folder", "warning")
        self.run_dir = str(path).strip()
        dpg.set_value(self._run_in, self.run_dir)
        self._new_job()
        if self.job is not None:
            self._say(self.job.message or f"run folder {self.run_dir}")

    def set_profile(self, name: str) -> None:
        if name not in PROFILES:
            return
        self.profile = name
        dpg.set_value(self._profile_in, name)
        if self.job is not None and not self.job.active:
            self.job.profile = name

    def set_options(self, text: str) -> bool:
        """Extra ``hravatar train`` options (e.g. ``--iterations 500``); False if they do not parse."""
        try:
            opts = shlex.split(text)
        except ValueError as e:
            self._say(f"extra options: {one_line(e)}", "warning")
            return False
        self.options = text
        dpg.set_value(self._options_in, text)
        if self.job is not None and not self.job.active:
            self.job.overrides = opts
        return True

    def start(self) -> bool:
        if self.job is None:
            self._new_job()
        if self.job is None:
            self._say("choose a dataset folder first", "warning")
            return False
        ok = self.job.start()
        self._after_action(ok)
        return ok

    def resume(self) -> bool:
        if self.job is None:
            return False
        ok = self.job.resume()
        self._after_action(ok)
        return ok

    def pause(self) -> None:
        if self.job is not None:
            self.job.pause()
            self._after_action(True)

    def stop(self) -> None:
        if self.job is not None:
            self.job.stop()
            self._after_action(True)

    def open_latest(self) -> bool:
        """Open the run's newest checkpoint in the viewport."""
        ck = self.job.checkpoint if self.job is not None else None
        if ck is None:
            self._say("this run has no checkpoint yet", "warning")
            return False
        self.ctx.open_checkpoint(ck)
        return True

    def poll(self) -> None:
        """Read the run's new events and show them (the frame callback calls this at ~4 Hz)."""
        if self.job is None:
            return
        before = self.job.state
        self.job.poll()
        after = self.job.state
        if after != before:
            failed = after == "failed"
            self._say(self.job.message, "error" if failed else "info")
            if after in _OPEN_ON and before in ("running", "pausing", "stopping") and self.auto_open and self.job.checkpoint:
                self.ctx.open_checkpoint(self.job.checkpoint)
        if self._auto_open_after_selftest is not None and not self.training_active:
            self._set_auto_open(self._auto_open_after_selftest)  # the self-test's run is over
            self._auto_open_after_selftest = None
        self._refresh()

    def close(self, keep_running: bool = False) -> None:
        """App exit: stop the run (checkpoint first) or leave it training in the background."""
        if self.job is not None:
            selftest_run = self._selftest_dir is not None and self.job.run_dir.is_relative_to(self._selftest_dir)
            if selftest_run:  # nothing worth keeping: end it now so its folder can go
                self.job.close(keep_running=False, wait_s=10.0, force=True)
            else:
                self.job.close(keep_running=keep_running)
        if self._selftest_dir is not None:
            shutil.rmtree(self._selftest_dir, ignore_errors=True)
            self._selftest_dir = None

    def selftest(self) -> None:
        """Tiny dataset in a temp folder, a short run started through the panel, a few polls, stop.

        Does not wait for the run: ``close()`` stops it and removes the folder.
        """
        if self.training_active:  # never disturb the user's run
            self.poll()
            return
        self._selftest_dir = Path(tempfile.mkdtemp(prefix="hravatar_train_selftest_"))
        # its tiny checkpoint is no avatar to look at: do not open it when the run ends
        self._auto_open_after_selftest = self.auto_open
        self._set_auto_open(False)
        user_options = self.options
        data = write_tiny_dataset(self._selftest_dir / "data", frames=4, res=32)
        self.set_dataset(str(data))
        self.set_run_dir(str(self._selftest_dir / "run"))  # never the folder of a run the user chose
        self.set_profile("quick")
        self.set_options(" ".join(("--iterations", "30") + TINY_OVERRIDES))
        if not self.start():
            raise RuntimeError(f"train panel self-test could not start: {self.job.message if self.job else ''}")
        self.set_options(user_options)  # the running job keeps its own copy
        end = time.monotonic() + 1.0
        while time.monotonic() < end and self.training_active:
            self.poll()
            time.sleep(0.1)
        self.pause()
        self.stop()
        self.poll()

    def show_run(self, run_dir: str | Path, dataset: str | Path | None = None) -> bool:
        """Follow a run folder (its plots and previews; a run still training is re-attached, a
        stopped one can be resumed when ``dataset`` is given). False when another run is active."""
        if self.training_active:
            self._say("stop the running training before choosing another run folder", "warning")
            return False
        if not Path(run_dir).expanduser().is_dir():
            self._say(f"{run_dir} is not a folder", "warning")
            return False
        self.dataset = str(dataset) if dataset else ""
        dpg.set_value(self._dataset_in, self.dataset)
        self.set_run_dir(str(run_dir))
        return self.job is not None

    def _set_auto_open(self, on: bool) -> None:
        self.auto_open = bool(on)
        dpg.set_value(self._auto_box, self.auto_open)

    # ---------------------------------------------------------------- internals
    def _new_job(self) -> None:
        self._clear_plots()
        self.job = None
        if not self.dataset and not self.run_dir:
            return
        try:
            self.job = TrainingJob(self.dataset or None, self.run_dir or None, self.profile, shlex.split(self.options))
        except ValueError as e:
            self._say(one_line(e), "warning")
            return
        p = self.job.progress
        if p.profile in PROFILES and self.job.has_saved_state:
            self.set_profile(p.profile)  # resuming needs the run's own profile
        self._last_state = ""
        self._refresh()

    def _after_action(self, ok: bool) -> None:
        self._say(self.job.message, "info" if ok else "warning")
        self._refresh()

    def _on_frame(self, dt: float) -> None:
        self._since_poll += dt
        if self._since_poll >= _POLL_S:
            self._since_poll = 0.0
            self.poll()

    def _say(self, text: str, level: str = "info") -> None:
        if not text:
            return
        dpg.set_value(self._msg, text)
        if level != "info":
            self.ctx.notify(text, level)

    def _clear_plots(self) -> None:
        for s in self._series.values():
            dpg.delete_item(s)
        self._series.clear()
        dpg.set_value(self._psnr_series, [[], []])
        dpg.set_value(self._gauss_series, [[], []])
        dpg.configure_item(self._plot_group, show=False)  # empty plots only show meaningless axes
        dpg.configure_item(self._no_data, show=True)
        self._shown_counts = ()
        self._shown_preview = None
        dpg.set_value(self._tex, np.zeros(_PREVIEW_W * _PREVIEW_H * 4, np.float32))
        dpg.configure_item(self._preview, show=False)
        dpg.configure_item(self._no_preview, show=True)

    def _refresh(self) -> None:
        """Buttons, progress text, plots and preview from the job's state and progress."""
        job = self.job
        can = {"start": job is not None and job.can_start, "pause": job is not None and job.can_pause,
               "resume": job is not None and job.can_resume, "stop": job is not None and job.can_stop,
               "open": job is not None and job.checkpoint is not None}
        for k, b in self._buttons.items():
            dpg.configure_item(b, enabled=can[k])
        idle = not self.training_active
        for item in (self._dataset_in, self._dataset_btn, self._run_in, self._run_btn, self._profile_in, self._options_in):
            dpg.configure_item(item, enabled=idle)
        if job is None:
            dpg.set_value(self._bar, 0.0)
            dpg.configure_item(self._bar, overlay="")
            dpg.set_value(self._stats, "")
            dpg.configure_item(self._stats, show=False)
            return
        p = job.progress
        dpg.set_value(self._bar, p.fraction)
        dpg.configure_item(self._bar, overlay=f"{job.state}  {p.iteration}/{p.total}" if p.total else job.state)
        stats = self.stats_text()
        dpg.set_value(self._stats, stats)
        dpg.configure_item(self._stats, show=bool(stats))  # no empty line
        self._update_plots()
        self._update_preview()

    def stats_text(self) -> str:
        """One line: phase, speed, ETA, Gaussian count, last PSNR."""
        p = self.job.progress if self.job is not None else None
        if p is None:
            return ""
        parts = []
        if p.phase == "encoder pre-training" and p.pretrain:
            parts.append(f"encoder pre-training {p.pretrain[0]}/{p.pretrain[1]}")
        if p.its is not None:
            parts.append(f"{p.its:.2f} it/s")
        if self.training_active:
            parts.append(f"ETA {format_eta(p.eta_s)}")
        if p.gaussians.last() is not None:
            parts.append(f"{int(p.gaussians.last()):,} Gaussians")
        if p.psnr.last() is not None:
            parts.append(f"test PSNR {p.psnr.last():.2f} dB")
        if p.device:
            parts.append(p.device)
        return "   ".join(parts)

    def _update_plots(self) -> None:
        p = self.job.progress
        counts = (tuple((k, len(s)) for k, s in p.losses.items()), len(p.psnr), len(p.gaussians))
        if counts == self._shown_counts:
            return  # nothing new: do not re-send the arrays every poll
        self._shown_counts = counts
        for name, s in p.losses.items():
            if name not in self._series:
                self._series[name] = dpg.add_line_series([], [], label=name, parent=self._loss_y)
            # log axis: non-positive values would vanish anyway
            ys = [max(y, 1e-8) for y in s.ys]
            dpg.set_value(self._series[name], [list(s.xs), ys])
        dpg.set_value(self._psnr_series, [list(p.psnr.xs), list(p.psnr.ys)])
        dpg.set_value(self._gauss_series, [list(p.gaussians.xs), list(p.gaussians.ys)])
        has_data = any(len(s) for s in p.losses.values()) or len(p.psnr) > 0 or len(p.gaussians) > 0
        dpg.configure_item(self._plot_group, show=has_data)
        dpg.configure_item(self._no_data, show=not has_data)

    def _update_preview(self) -> None:
        path = self.job.progress.preview_path or latest_preview(self.job.run_dir)
        if path is None or path == self._shown_preview:
            return
        img = load_preview(path, _PREVIEW_W, _PREVIEW_H)
        if img is not None:
            dpg.set_value(self._tex, img.ravel())
            self._shown_preview = path
            dpg.configure_item(self._preview, show=True)
            dpg.configure_item(self._no_preview, show=False)


def build(parent, ctx) -> TrainPanel:
    """Build the Train tab inside dearpygui container ``parent``."""
    return TrainPanel(parent, ctx)
