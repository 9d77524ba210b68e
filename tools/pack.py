#!/usr/bin/env python
"""Pack a dataset split into webdataset shards + manifest. See segtrain/pack.py for details.

    python tools/pack.py --voc-root datasets/data/VOCdevkit/VOC2012 --split train --out shards/
    python tools/pack.py --dataset folder --root mine --split train --out shards/
"""
import sys

from segtrain.pack import main

if __name__ == "__main__":
    sys.exit(main())
