"""Make digits/demo_model.safetensors, the model `comfy-selfnpo-train --demo` uses: the quality
benchmark's digits model and classifier, trained exactly as bench/quality.py trains them (same
budget, seeds and thread count, hence the same weights), the UNet stored in float16.

  pip install -e '.[bench]'                       # scikit-learn: the digits data
  python scripts/make_digits_demo_model.py        # about 8 minutes on 2 CPU cores

The base model of an earlier full benchmark run (bench/results/quality_work_full) is reused when its
budget matches, which makes this take seconds after `python bench/quality.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _boot import ROOT, boot_comfyui  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "digits" / "demo_model.safetensors"))
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "quality_work_full"),
                        help="work folder of the base model (bench/quality.py's, reused when its budget matches)")
    args = parser.parse_args(argv)
    boot_comfyui(cpu=True)
    import safetensors.torch
    import torch

    import quality_pipeline as pipeline
    from comfy_selfnpo.digits import demo, metrics
    from comfy_selfnpo.digits import model as dm

    budget = pipeline.Budget()
    torch.set_num_threads(budget.threads)  # the benchmark's: float sums, hence the weights, depend on it
    digits = pipeline.split_digits(budget.per_class, budget.data_seed)
    classifier = metrics.train_classifier(digits.train_images, digits.train_labels, seed=budget.data_seed,
                                          epochs=budget.classifier_epochs)
    reference = metrics.Reference.from_images(classifier, digits.test_images)
    setup = pipeline.Setup(args.work, asdict(budget))
    pipeline.train_base_model(setup, digits, print, reuse=True)
    _model, clip = dm.build_digits_checkpoint(budget.data_seed)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    demo.save_demo_model(tmp, safetensors.torch.load_file(str(setup.base_file)), classifier, reference.features,
                         dm.PromptConds.encode(clip), {"seed": budget.data_seed, "base_model": budget.base_fingerprint(),
                                                       "made_by": "scripts/make_digits_demo_model.py"})
    os.replace(tmp, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
