#!/usr/bin/env python
"""Download PASCAL VOC 2012 (and, with --sbd, SBD's train_aug labels) into datasets/data.

    python tools/download_voc.py [--root datasets/data] [--sbd] [--url URL ...] [--no-extract]

The logic lives in segtrain/download.py; this wrapper only makes it runnable from a checkout.
"""
import sys
from pathlib import Path

# Running a script puts tools/ on sys.path, not the repository root: add it so a
# checkout works before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segtrain.download import main  # noqa: E402

if __name__ == "__main__":
    main()
