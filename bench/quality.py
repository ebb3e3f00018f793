"""What Self-NPO guidance does to image quality, measured end to end on the CPU.

Pipeline (everything is trained here, from a fixed seed; nothing is downloaded):
  1. data       scikit-learn's handwritten digits (1797 8x8 images, ships inside the package), split
                into a held-out reference set (PER_CLASS per class) and a training set
  2. judge      a small CNN classifier trained on the training set; its penultimate layer is the
                feature space of the metrics (bench/quality_metrics.py)
  3. model      the tiny SD1.5 UNet (ComfyUI's own classes) trained from scratch on the training digits
                with class-name prompts ("a handwritten digit seven") encoded by the tiny CLIP, and
                10 % condition dropout so the empty prompt is a usable CFG negative (digits_model.py)
  4. negatives  the pack's real TDFT trainer makes the Self-NPO negative model, data-free (prompts
                only) and with data (the training digits as latents); a control gets the same budget
                (steps, batch, learning rate, AdamW) as plain fine-tuning on real data with the
                ordinary diffusion loss, to separate "any fine-tune" from TDFT
  5. sampling   ComfyUI's KSampler code path (comfy.sample.sample) on the base model: plain CFG, and
                the pack's real `apply_self_npo` for every row of ROWS (guidance mode x negative model
                x interval), over a sweep of guidance scales g, several noise seeds
  6. metrics    Fréchet distance in the classifier's feature space, k-NN precision and recall,
                accuracy of the requested class: mean and standard error over the seeds

Rows whose guidance mode or interval this version of the pack does not offer yet are listed as
skipped (detected from `apply_self_npo`'s signature and its errors), so the script runs on every
version and covers each mode once it exists.

  pip install -e '.[bench]'              # scikit-learn: the digits data (a bench-only dependency)
  python bench/quality.py                # full budget: about 15 min on 2 CPU cores
  python bench/quality.py --budget toy   # the whole pipeline in about a minute (what the test runs)
  python bench/quality.py --publish      # also copy the figure and JSON to docs/ (for the README)
Writes bench/results/quality.json, quality_frontier.png and quality_samples.png.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _boot import ROOT, boot_comfyui  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


@dataclass(frozen=True)
class Budget:
    """Everything that sets the cost of a run."""
    base_steps: int = 3000          # training the digits model from scratch
    base_batch: int = 64
    base_lr: float = 2e-3
    npo_steps: int = 300            # each negative model: TDFT (both kinds) and the control
    npo_batch: int = 32
    npo_lr: float = 2e-5            # 1 % of base_lr: the paper's ratio (1e-6 on SD1.5, trained at 1e-4)
    npo_buffer: int = 64            # data-free TDFT: buffered trajectories
    classifier_epochs: int = 30
    per_class: int = 30             # held-out real digits per class = generated samples per class and seed
    seeds: tuple = (0, 1, 2)        # sampling noise seeds
    guidance_scales: tuple = (1.5, 2.0, 3.0, 5.0)
    sampling_steps: int = 12        # euler: FD within 10 % of 32 steps
    sampler: str = "euler"
    scheduler: str = "normal"
    data_seed: int = 0              # split, model initialisation, training draws
    threads: int = 2


BUDGETS = {
    "full": Budget(),
    # the whole pipeline at toy size: the test suite runs it (numbers mean nothing about quality)
    "toy": Budget(base_steps=30, base_batch=32, npo_steps=3, npo_batch=4, npo_buffer=8, classifier_epochs=8,
                  per_class=6, seeds=(0,), guidance_scales=(2.0, 4.0), sampling_steps=4, threads=1),
}


# Guidance-interval of Kynkäänniemi et al. 2024 (noise levels where guidance helps), as sigmas; the
# rows give it to apply_self_npo as ComfyUI start/end percents computed from the model's schedule.
INTERVAL_SIGMAS = (5.42, 0.28)


@dataclass(frozen=True)
class Row:
    """One curve of the sweep: guidance with `negative` ("" = plain CFG, no negative model) and
    extra keyword arguments of apply_self_npo. A new mode or variant is one more entry in ROWS."""
    name: str
    negative: str = ""
    options: tuple = ()             # (("mode", "autoguidance"), ...)
    interval: bool = False

    def kwargs(self, interval_percents) -> dict:
        out = dict(self.options)
        if self.interval:
            out["start_percent"], out["end_percent"] = interval_percents
        return out


# mode "npo" (the paper's) is apply_self_npo's default, so its rows name no mode and run on every version
ROWS = (
    Row("cfg"),
    Row("npo · Self-NPO data-free", "self_npo_data_free"),
    Row("npo · Self-NPO with data", "self_npo_data"),
    Row("npo · fine-tune control", "finetune_control"),
    Row("npo · Self-NPO data-free · interval", "self_npo_data_free", interval=True),
    Row("autoguidance · Self-NPO data-free", "self_npo_data_free", (("mode", "autoguidance"),)),
    Row("autoguidance · Self-NPO data-free · interval", "self_npo_data_free", (("mode", "autoguidance"),),
        interval=True),
    Row("cfg+autoguidance · Self-NPO data-free", "self_npo_data_free",
        (("mode", "cfg+autoguidance"), ("autoguidance_scale", 1.0))),
    Row("cfg+autoguidance · Self-NPO data-free · interval", "self_npo_data_free",
        (("mode", "cfg+autoguidance"), ("autoguidance_scale", 1.0)), interval=True),
)
METRICS = ("fd", "precision", "recall", "accuracy")
UNGUIDED = "no guidance (g = 1)"
REAL = "real digits (held out)"


# ------------------------------------------------------------------------------------------------
# data, judge, model

@dataclass
class Digits:
    train_images: object
    train_labels: object
    test_images: object
    test_labels: object


def split_digits(per_class: int, seed: int) -> Digits:
    """A stratified held-out set of `per_class` digits per class; the rest trains."""
    import torch
    from comfy_selfnpo.digits_model import load_digits_images

    images, labels = load_digits_images()
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    test = torch.cat([order[labels[order] == c][:per_class] for c in range(10)])
    is_train = torch.ones(labels.shape[0], dtype=torch.bool)
    is_train[test] = False
    return Digits(images[is_train], labels[is_train], images[test], labels[test])


def train_base_model(digits: Digits, budget: Budget, log):
    from comfy_selfnpo import digits_model as dm

    settings = dm.DenoiserTraining(steps=budget.base_steps, batch_size=budget.base_batch,
                                   learning_rate=budget.base_lr, seed=budget.data_seed)
    every = max(1, budget.base_steps // 10)
    return dm.train_digits_model(digits.train_images, digits.train_labels, settings, on_step=lambda s, l: log(
        f"  base model step {s}/{budget.base_steps} loss {l:.4f}") if s % every == 0 else None)


# ------------------------------------------------------------------------------------------------
# negative models

def _tdft_negative(model, clip, data, budget: Budget, work_dir: Path, log):
    from comfy_selfnpo.training import TDFTTrainer, make_config

    # the SD1.5 recipe's algorithm (N = 25, K = 5, w = -1, pseudo-Huber, EMA teacher), full weights,
    # at the benchmark's budget; resolution 64 = the 8x8 latent (data-free mode draws latents of it)
    config = make_config("sd15", steps=budget.npo_steps, batch_size=budget.npo_batch, grad_accum=1,
                         learning_rate=budget.npo_lr, mixed_precision="no", resolution=64,
                         trajectory_buffer=budget.npo_buffer, seed=budget.data_seed)
    trainer = TDFTTrainer(model, clip, None, data, config, work_dir, log=lambda m: None)
    result = trainer.train()
    log(f"  {type(data).__name__}: {result.steps} TDFT steps, final loss {result.losses[-1]:.4g}")
    return trainer.negative_model(), result.losses


def self_npo_data_free(ctx, budget, log):
    from comfy_selfnpo.digits_model import PROMPTS
    from comfy_selfnpo.training import PromptList

    return _tdft_negative(ctx.model, ctx.clip, PromptList(list(PROMPTS)), budget, ctx.work_dir / "data_free", log)


def self_npo_data(ctx, budget, log):
    from comfy_selfnpo.digits_model import images_to_latents, prompt_for
    from comfy_selfnpo.training import LatentDataset

    data = LatentDataset(images_to_latents(ctx.digits.train_images),
                         [prompt_for(int(c)) for c in ctx.digits.train_labels])
    return _tdft_negative(ctx.model, ctx.clip, data, budget, ctx.work_dir / "data", log)


def finetune_control(ctx, budget, log):
    """Plain fine-tuning on real data with TDFT's budget and optimiser settings (constant learning
    rate, AdamW, weight decay 1e-3, clip 1.0, no condition dropout: TDFT's student always sees the
    caption), used as the negative model exactly like the TDFT result."""
    from comfy_selfnpo import digits_model as dm

    copy, _ = dm.build_digits_checkpoint(budget.data_seed)
    copy.model.diffusion_model.load_state_dict(ctx.model.model.diffusion_model.state_dict())
    settings = dm.DenoiserTraining(steps=budget.npo_steps, batch_size=budget.npo_batch,
                                   learning_rate=budget.npo_lr, uncond_probability=0.0, warmup_steps=0,
                                   ema_decay=0.0, seed=budget.data_seed)
    losses = dm.train_denoiser(copy, dm.images_to_latents(ctx.digits.train_images),
                               ctx.conds.for_labels(ctx.digits.train_labels), ctx.conds.uncond, settings)
    log(f"  fine-tune control: {len(losses)} steps, final loss {losses[-1]:.4g}")
    return dm.weight_offset_model(ctx.model, copy.model.diffusion_model.state_dict()), losses


NEGATIVES = {
    "self_npo_data_free": self_npo_data_free,
    "self_npo_data": self_npo_data,
    "finetune_control": finetune_control,
}


# ------------------------------------------------------------------------------------------------
# guidance and sampling

def unsupported_reason(row: Row, interval_percents) -> str | None:
    """Why this version of apply_self_npo cannot run `row` (None when it can)."""
    from comfy_selfnpo.npo import guidance

    params = inspect.signature(guidance.apply_self_npo).parameters
    missing = sorted(k for k in row.kwargs(interval_percents) if k not in params)
    if missing:
        return f"apply_self_npo has no {', '.join(missing)} in this version"
    return None


def guided_model(ctx, row: Row):
    """The MODEL that KSampler samples for this row (the base model itself for plain CFG)."""
    from comfy_selfnpo.npo import guidance

    if not row.negative:
        return ctx.model
    return guidance.apply_self_npo(ctx.model, ctx.negatives[row.negative], residency="auto",
                                   **row.kwargs(ctx.interval_percents))


def sample_digits(model, ctx, g: float, seed: int):
    """One batch: `per_class` digits of every class, through KSampler's code path. Images [N, 8, 8]."""
    import torch
    import comfy.sample
    from comfy_selfnpo.digits_model import latents_to_images

    b = ctx.budget
    noise = torch.randn((ctx.labels.shape[0], 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    raw = comfy.sample.sample(model, noise, b.sampling_steps, g, b.sampler, b.scheduler,
                              ctx.conds.positive(ctx.labels), ctx.conds.negative(), torch.zeros_like(noise),
                              disable_pbar=True, seed=seed)
    return latents_to_images(ctx.model.model.process_latent_in(raw))


def score_point(model, ctx, g: float, name: str) -> dict:
    """Metrics of one (model, g) over the seeds: {metric: [mean, stderr]} and the per-seed values.
    The first seed's samples are kept for the sample figure."""
    from quality_metrics import mean_and_stderr

    per_seed = []
    for seed in ctx.budget.seeds:
        images = sample_digits(model, ctx, g, seed)
        per_seed.append(ctx.reference.score(images, ctx.labels))
        ctx.samples.setdefault((name, g), images)
    out = {"g": g}
    for metric in METRICS:
        out[metric] = list(mean_and_stderr([s[metric] for s in per_seed]))
    out["per_seed"] = per_seed
    return out


def _point_line(name: str, p: dict) -> str:
    return (f"  {name:50} g={p['g']:<4g} FD {p['fd'][0]:7.2f}  P {p['precision'][0]:.3f}  "
            f"R {p['recall'][0]:.3f}  acc {p['accuracy'][0]:.3f}")


def sweep(ctx, rows, log) -> list[dict]:
    results = []
    for row in rows:
        entry = {"name": row.name, "negative": row.negative, "options": row.kwargs(ctx.interval_percents),
                 "skipped": unsupported_reason(row, ctx.interval_percents), "points": []}
        results.append(entry)
        if entry["skipped"]:
            log(f"  {row.name}: skipped ({entry['skipped']})")
            continue
        try:
            model = guided_model(ctx, row)
        except (ValueError, TypeError) as e:  # e.g. a mode name this version does not know
            entry["skipped"] = f"apply_self_npo refused it: {e}"
            log(f"  {row.name}: skipped ({entry['skipped']})")
            continue
        for g in ctx.budget.guidance_scales:
            entry["points"].append(score_point(model, ctx, g, row.name))
            log(_point_line(row.name, entry["points"][-1]))
    return results


# ------------------------------------------------------------------------------------------------
# the run

@dataclass
class Context:
    budget: Budget
    work_dir: Path
    digits: Digits = None
    reference: object = None
    model: object = None
    clip: object = None
    conds: object = None
    labels: object = None
    negatives: dict = field(default_factory=dict)
    interval_percents: tuple = (0.0, 1.0)
    samples: dict = field(default_factory=dict)   # (row name, g) -> first seed's images


@contextmanager
def stage(timings: dict, name: str, log):
    """Wall time of a stage into timings[name], its CPU time (all threads) into timings["cpu"][name]:
    on a shared machine the CPU time shows what the stage costs when it has the cores to itself."""
    log(f"{name} ...")
    start, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    timings.setdefault("cpu", {})[name] = round(time.process_time() - cpu, 1)
    log(f"{name}: {timings[name]} s (CPU {timings['cpu'][name]} s)")


def run(budget: Budget, work_dir: Path, rows=ROWS, log=print):
    """The whole benchmark. Returns (results: what quality.json holds, samples: (row name, g) ->
    the first seed's images [N, 8, 8], plus the held-out real digits under REAL)."""
    import torch
    import comfy.model_management
    import quality_metrics as qm
    from comfy_selfnpo import digits_model as dm

    torch.set_num_threads(budget.threads)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    ctx, timings, start = Context(budget, Path(work_dir)), {}, time.perf_counter()
    with stage(timings, "data and classifier", log):
        ctx.digits = split_digits(budget.per_class, budget.data_seed)
        classifier = qm.train_classifier(ctx.digits.train_images, ctx.digits.train_labels,
                                         seed=budget.data_seed, epochs=budget.classifier_epochs)
        ctx.reference = qm.Reference.from_images(classifier, ctx.digits.test_images)
        ctx.labels = ctx.digits.test_labels.sort().values  # per_class of each class, grouped
        references = reference_scores(ctx)
    with stage(timings, "base model", log):
        base = train_base_model(ctx.digits, budget, log)
        ctx.model, ctx.clip, ctx.conds, base_losses = base.model, base.clip, base.conds, base.losses
        ctx.interval_percents = tuple(round(dm.sampling_sigma_to_percent(ctx.model, s), 3) for s in INTERVAL_SIGMAS)
    needed = {r.negative for r in rows if r.negative and not unsupported_reason(r, ctx.interval_percents)}
    losses = {"base": base_losses}
    for name in NEGATIVES:
        if name in needed:
            with stage(timings, f"negative model {name}", log):
                ctx.negatives[name], losses[name] = NEGATIVES[name](ctx, budget, log)
    with stage(timings, "sampling and metrics", log):
        unguided = score_point(ctx.model, ctx, 1.0, UNGUIDED)
        log(_point_line(UNGUIDED, unguided))
        rows_out = sweep(ctx, rows, log)
    comfy.model_management.unload_all_models()
    timings["total"] = round(time.perf_counter() - start, 1)
    timings["cpu"]["total"] = round(sum(timings["cpu"].values()), 1)
    ctx.samples[(REAL, 1.0)] = ctx.digits.test_images[ctx.digits.test_labels.argsort(stable=True)]
    results = {
        "budget": asdict(budget), "machine": machine, "interval_percents": list(ctx.interval_percents),
        "interval_sigmas": list(INTERVAL_SIGMAS), "unet_parameters": dm.count_parameters(ctx.model),
        "timings_s": timings, "references": references, "unguided": unguided, "rows": rows_out,
        "final_losses": {k: v[-1] for k, v in losses.items()},
    }
    results["best_fd"] = best_points(results)
    return results, ctx.samples


def reference_scores(ctx) -> dict:
    """What the metrics give for real digits (a training subset the size of the reference set)
    and for uniform noise: the scale the generated numbers are read against."""
    import torch

    d = ctx.digits
    gen = torch.Generator().manual_seed(ctx.budget.data_seed)
    order = torch.randperm(d.train_labels.shape[0], generator=gen)  # random: the data come grouped by writer
    picks = torch.cat([order[d.train_labels[order] == c][:ctx.budget.per_class] for c in range(10)])
    noise = torch.rand(d.test_images.shape, generator=gen)
    return {"real_train_digits": ctx.reference.score(d.train_images[picks], d.train_labels[picks]),
            "real_test_digits_accuracy": ctx.reference.score(d.test_images, d.test_labels)["accuracy"],
            "uniform_noise": ctx.reference.score(noise, d.test_labels)}


# ------------------------------------------------------------------------------------------------
# outputs

def table(results: dict) -> str:
    """The printed table: every scored point as mean ± standard error over the seeds."""
    seeds = len(results["budget"]["seeds"])
    head = f"{'row':50} {'g':>4}  {'FD':>13}  {'precision':>13}  {'recall':>13}  {'accuracy':>13}"
    lines = [f"Self-NPO quality benchmark: mean ± standard error over {seeds} seed(s)", head, "-" * len(head)]

    def line(name, p):
        cells = "  ".join(f"{p[m][0]:7.3f}±{p[m][1]:<5.3f}" for m in METRICS)
        return f"{name:50} {p['g']:>4g}  {cells}"

    ref = results["references"]
    for name, r in (("real digits (train subset vs held-out)", ref["real_train_digits"]),
                    ("uniform noise", ref["uniform_noise"])):
        lines.append(line(name, {"g": float("nan"), **{m: [r[m], 0.0] for m in METRICS}}))
    lines.append(line(UNGUIDED, results["unguided"]))
    for row in results["rows"]:
        if row["skipped"]:
            lines.append(f"{row['name']:50}    skipped: {row['skipped']}")
        for p in row["points"]:
            lines.append(line(row["name"], p))
    t = results["timings_s"]
    lines.append(f"wall time {t['total']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()
                                                              if k not in ("total", "cpu"))
                 + f"), CPU time {t['cpu']['total']:.0f} s with {results['budget']['threads']} thread(s), load "
                 f"average at start {results['machine']['load_average_at_start'][0]}")
    lines.append(f"classifier accuracy on held-out real digits {ref['real_test_digits_accuracy']:.3f}")
    return "\n".join(lines)


def best_points(results: dict) -> list[dict]:
    """Per scored row, the point of its curve (g = 1 included) with the lowest mean FD: how good
    each method gets when g is tuned for it, the fair comparison between methods whose useful g differ."""
    out = []
    for row in results["rows"]:
        if row["points"]:
            best = min([results["unguided"]] + row["points"], key=lambda p: p["fd"][0])
            out.append({"name": row["name"], **{k: v for k, v in best.items() if k != "per_seed"}})
    return out


def summary_table(results: dict) -> str:
    head = f"{'best FD over the g sweep':50} {'g':>4}  {'FD':>13}  {'precision':>13}  {'recall':>13}  {'accuracy':>13}"
    lines = [head, "-" * len(head)]
    for p in results["best_fd"]:
        lines.append(f"{p['name']:50} {p['g']:>4g}  " + "  ".join(f"{p[m][0]:7.3f}±{p[m][1]:<5.3f}" for m in METRICS))
    return "\n".join(lines)


def shown_scale(budget: Budget) -> float:
    """The guidance scale the sample figure shows: the sweep's value closest to 3."""
    return min(budget.guidance_scales, key=lambda g: abs(g - 3.0))


def write_outputs(results: dict, samples: dict, out: Path) -> dict[str, Path]:
    import quality_plot
    from comfy_selfnpo.digits_model import image_grid

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "frontier": out / "quality_frontier.png",
             "samples": out / "quality_samples.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, paths["json"])
    quality_plot.frontier_figure(results).save(paths["frontier"])
    g = shown_scale(Budget(**{**results["budget"], "seeds": tuple(results["budget"]["seeds"]),
                              "guidance_scales": tuple(results["budget"]["guidance_scales"])}))
    per_class = results["budget"]["per_class"]
    keep = [c * per_class + i for c in range(10) for i in range(min(2, per_class))]  # 2 of each class
    strips = [(REAL, samples[(REAL, 1.0)]), (UNGUIDED, samples[(UNGUIDED, 1.0)])]
    strips += [(f"{r['name']}, g = {g:g}", samples[(r["name"], g)]) for r in results["rows"] if r["points"]]
    quality_plot.sample_figure([(label, image_grid(images[keep], len(keep))) for label, images in strips]).save(
        paths["samples"])
    return paths


def publish(paths: dict[str, Path]) -> None:
    """Copy the frontier figure, the sample figure and the JSON to their tracked places in docs/."""
    (DOCS / "images").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths["json"], DOCS / "quality_results.json")
    shutil.copyfile(paths["frontier"], DOCS / "images" / "quality_frontier.png")
    shutil.copyfile(paths["samples"], DOCS / "images" / "quality_samples.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the budget's)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for quality.json and the figures")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the figure and JSON to docs/ (what the README shows)")
    args = parser.parse_args(argv)
    boot_comfyui(cpu=True)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    budget = BUDGETS[args.budget]
    if args.threads:
        budget = replace(budget, threads=args.threads)
    out = Path(args.out)
    results, samples = run(budget, out / "quality_work")
    results["budget_name"] = args.budget
    paths = write_outputs(results, samples, out)
    print(table(results))
    print(summary_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.publish:
        publish(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
