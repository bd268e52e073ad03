"""Rebuild the embedded base model (src/lorafleet/assets/base-model). Same as `lorafleet pretrain`.

    .venv/bin/python scripts/build_base_model.py --out src/lorafleet/assets/base-model
"""
import sys

from lorafleet.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
