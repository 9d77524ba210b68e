"""Convert VainF/DeepLabV3Plus-Pytorch or torchvision DeepLabV3 weights to a segtrain checkpoint.

    python tools/convert_checkpoint.py --from vainf|torchvision SRC --out DST [--num-classes N] [--output-stride 8|16]

The work is done by segtrain.convert (also runnable as ``python -m segtrain.convert``).
"""
import sys

from segtrain.convert import main

if __name__ == "__main__":
    sys.exit(main())
