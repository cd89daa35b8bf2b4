"""One event stream for training progress; listeners subscribe without the trainer knowing them.

Events are plain JSON-able dicts: ``{"kind": ..., "iteration": int, "time": float, ...}``.
Kinds: "start" (total, num_gaussians, config), "iter" (losses, lrs, num_gaussians, its, eta_s),
"eval" (psnr, ...), "preview" (path), "checkpoint" (path), "done" (path), "error" (message).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

Listener = Callable[[dict], None]


class EventBus:
    """Fan-out of training events to listeners; a failing listener never stops training."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def emit(self, kind: str, iteration: int, **data) -> dict:
        ev = {"kind": kind, "iteration": int(iteration), "time": time.time(), **data}
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception as e:  # a broken display must not kill a long run
                print(f"hravatar: event listener {getattr(fn, '__name__', fn)} failed: {e}")
        return ev


class JsonlLog:
    """Appends events to ``RUN_DIR/events.jsonl`` (the app's training tab tails this file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def __call__(self, ev: dict) -> None:
        self._f.write(json.dumps(ev) + "\n")
        if ev["kind"] in ("checkpoint", "done", "error", "eval"):
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Events appended since byte ``offset`` (complete lines only) and the new offset."""
    p = Path(path)
    if not p.exists():
        return [], offset
    with open(p, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    out = []
    for line in data[:end].splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out, offset + end


class TensorBoardLog:
    """Scalars to TensorBoard when ``torch.utils.tensorboard`` (the tensorboard package) is installed."""

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # raises ImportError without tensorboard

        self.w = SummaryWriter(str(logdir))

    def __call__(self, ev: dict) -> None:
        it = ev["iteration"]
        if ev["kind"] == "iter":
            for k, v in ev.get("losses", {}).items():
                self.w.add_scalar(f"loss/{k}", v, it)
            for k, v in ev.get("lrs", {}).items():
                self.w.add_scalar(f"lr/{k}", v, it)
            self.w.add_scalar("gaussians", ev.get("num_gaussians", 0), it)
        elif ev["kind"] == "eval":
            for k, v in ev.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "time"):
                    self.w.add_scalar(f"eval/{k}", v, it)

    def close(self) -> None:
        self.w.close()


class RichProgress:
    """Terminal progress display (rich) for the "iter"/"eval" events."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"))
        self.task = None
        self.last_psnr = None

    def __call__(self, ev: dict) -> None:
        k = ev["kind"]
        if k == "start":
            self.progress.start()
            self.task = self.progress.add_task("train", total=ev["total"], completed=ev["iteration"], info="")
        elif k == "iter" and self.task is not None:
            psnr = f" psnr {self.last_psnr:.2f}" if self.last_psnr is not None else ""
            info = f"loss {ev['losses'].get('total', 0):.4f}  {ev['num_gaussians']:,} G  {ev['its']:.2f} it/s{psnr}"
            self.progress.update(self.task, completed=ev["iteration"], info=info)
        elif k == "eval":
            self.last_psnr = ev.get("psnr")
            self.progress.console.print(f"iter {ev['iteration']}: test PSNR {ev.get('psnr', float('nan')):.2f} dB")
        elif k in ("done", "error"):
            self.progress.stop()
            if k == "error":
                self.progress.console.print(f"[red]training stopped: {ev['message']}")
