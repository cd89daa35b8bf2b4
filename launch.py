#!/usr/bin/env python3
"""Open the hravatar desktop app: ``python launch.py [CHECKPOINT]`` (the bundled demo avatar by default).

``python launch.py --help`` lists the options (headless smoke test, benchmark, ...).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing

from app.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
