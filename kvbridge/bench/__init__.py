"""Benchmarks: ``kvbridge bench engine | transfer | serve``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def out_folder(path: str) -> Path:
    """argparse ``type`` of ``--out``: a folder that exists or can be made (the command makes
    it when it writes). Otherwise a usage error (one line, exit 2) before the run starts,
    not a traceback after its set-up."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    ancestor = p.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot create the folder {path}: {ancestor} is not a writable folder")
    return p
