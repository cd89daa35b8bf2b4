#!/usr/bin/env python3
"""Open hravatar on an avatar (the bundled demo avatar by default).

Until the desktop viewer lands (issue 4) this renders the avatar under a built-in studio
environment and writes a PNG, printing its path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", nargs="?", default=None, help="avatar checkpoint (default: bundled demo avatar)")
    p.add_argument("--out", default=str(ROOT / "out" / "demo.png"), help="where to write the preview image")
    p.add_argument("--envmap", default=None, help="builtin:NAME, learned, or an .hdr/.exr file (default: the avatar's learned light)")
    p.add_argument("--res", type=int, default=512)
    a = p.parse_args(argv)
    from hravatar.cli.main import main as cli

    args = ["render"] + ([a.checkpoint] if a.checkpoint else []) + ["--out", a.out, "--res", str(a.res)]
    if a.envmap:
        args += ["--envmap", a.envmap]
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
