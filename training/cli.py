"""`comfy-selfnpo-train`: headless Self-NPO (TDFT) training on a checkpoint ComfyUI can load."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-selfnpo-train",
        description="Train a Self-NPO negative model with truncated diffusion fine-tuning (TDFT), "
                    "using ComfyUI's loaders and memory management, without starting the server.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
