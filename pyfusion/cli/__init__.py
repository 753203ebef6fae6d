"""The ``pyfusion`` command line. SKELETON: only ``info``; the CLI work adds demo / fuse / sweep / bench."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyfusion", description="Fast neuron-level model fusion")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and available backends")
    args = parser.parse_args(argv)
    if args.command == "info":
        from pyfusion.info import main as info_main

        return info_main()
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
