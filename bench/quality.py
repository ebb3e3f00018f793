"""What Self-NPO guidance does to image quality, measured end to end on the CPU.

Pipeline (everything is trained here, from a fixed seed; nothing is downloaded):
  1. data       scikit-learn's handwritten digits (1797 8x8 images, ships inside the package), split
                into a held-out reference set (PER_CLASS per class) and a training set
  2. judge      a small CNN classifier trained on the training set; its penultimate layer is the
                feature space of the metrics (digits/metrics.py)
  3. model      the tiny SD1.5 UNet (ComfyUI's own classes) trained from scratch on the training digits
                with class-name prompts ("a handwritten digit seven") encoded by the tiny CLIP, and
                10 % condition dropout so the empty prompt is a usable CFG negative (digits/model.py)
  4. negatives  the pack's real TDFT trainer makes the Self-NPO negative model, data-free (prompts
                only) and with data (the training digits as latents); a control gets the same budget
                (steps, batch, learning rate, AdamW) as plain fine-tuning on real data with the
                ordinary diffusion loss, to separate "any fine-tune" from TDFT
  5. sampling   ComfyUI's KSampler code path (comfy.sample.sample) on the base model: plain CFG, and
                the pack's real `apply_self_npo` for every row of ROWS (guidance mode x negative model
                x interval), over a sweep of guidance scales g, several noise seeds
  6. metrics    Fréchet distance in the classifier's feature space, k-NN precision and recall,
                accuracy of the requested class: mean and standard error over the seeds

  pip install -e '.[bench]'              # scikit-learn: the digits data (a bench-only dependency)
  python bench/quality.py                # full budget: about 15 min on 2 CPU cores
  python bench/quality.py --budget toy   # the whole pipeline in about a minute (what the test runs)
  python bench/quality.py --publish      # also copy the figure and JSON to docs/ (for the README)
  python bench/quality.py --report docs/quality_results.json   # the tables of the published run
  python bench/quality.py --check docs/quality_results.json
                                         # a fresh run against the published one: exit 1 unless every
                                         # point lies within its reported standard error
Writes bench/results/quality.json, quality_frontier.png and quality_samples.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from _boot import ROOT, boot_comfyui  # noqa: E402
import quality_pipeline as pipeline  # noqa: E402
from quality_pipeline import Budget  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"


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
# the sweep

def sample_jobs(rows, budget: Budget, interval_percents) -> list:
    """Every (row, g, seed) to sample, the unguided g = 1 batches first."""
    jobs = [pipeline.SampleJob(UNGUIDED, "", (), 1.0, seed) for seed in budget.seeds]
    for row in rows:
        options = tuple(sorted(row.kwargs(interval_percents).items()))
        jobs += [pipeline.SampleJob(row.name, row.negative, options, g, seed)
                 for g in budget.guidance_scales for seed in budget.seeds]
    return jobs


def point(per_seed: list[dict], g: float) -> dict:
    """Metrics of one (row, g) over the seeds: {metric: [mean, stderr]} and the per-seed values."""
    from comfy_selfnpo.digits.metrics import mean_and_stderr

    out = {"g": g}
    for metric in METRICS:
        out[metric] = list(mean_and_stderr([s[metric] for s in per_seed]))
    out["per_seed"] = per_seed
    return out


def _point_line(name: str, p: dict) -> str:
    return (f"  {name:50} g={p['g']:<4g} FD {p['fd'][0]:7.2f}  P {p['precision'][0]:.3f}  "
            f"R {p['recall'][0]:.3f}  acc {p['accuracy'][0]:.3f}")


def collect(rows, budget: Budget, interval_percents, done: dict, log) -> tuple[dict, list]:
    """Per-seed scores (done[(row, g, seed)]) -> the unguided point and one entry per row."""
    unguided = point([done[(UNGUIDED, 1.0, s)] for s in budget.seeds], 1.0)
    log(_point_line(UNGUIDED, unguided))
    entries = []
    for row in rows:
        entry = {"name": row.name, "negative": row.negative, "options": row.kwargs(interval_percents), "points": []}
        entries.append(entry)
        for g in budget.guidance_scales:
            entry["points"].append(point([done[(row.name, g, s)] for s in budget.seeds], g))
            log(_point_line(row.name, entry["points"][-1]))
    return unguided, entries


# ------------------------------------------------------------------------------------------------
# the run

@contextmanager
def stage(timings: dict, name: str, log):
    """Wall time of a stage into timings[name], the CPU time of this process into timings["cpu"][name]
    (add_worker_cpu adds the workers'): on a shared machine the CPU time says what it costs alone."""
    log(f"{name} ...")
    start, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = round(time.perf_counter() - start, 1)
    cpu_times = timings.setdefault("cpu", {})
    cpu_times[name] = round(cpu_times.get(name, 0.0) + time.process_time() - cpu, 1)
    log(f"{name}: {timings[name]} s (CPU {cpu_times[name]} s)")


class JobRunner:
    """Runs jobs in this process (one worker) or in `workers` single-threaded processes, and counts
    the CPU time the worker processes report (this process's own is counted by `stage`)."""

    def __init__(self, setup, workers: int, timings: dict):
        self.setup, self.workers, self.timings, self.pool = setup, workers, timings, None

    def __enter__(self):
        if self.workers <= 1:
            pipeline.init_worker(self.setup, boot=False)
        else:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(self.workers, pipeline.init_worker, (self.setup, True))
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate() if exc[0] else self.pool.close()
            self.pool.join()

    def map(self, fn, jobs, stage_name: str):
        """Results of fn(job) as they finish; fn returns (..., CPU seconds)."""
        results = map(fn, jobs) if self.pool is None else self.pool.imap_unordered(fn, jobs)
        for result in results:
            if self.pool is not None:
                cpu = self.timings.setdefault("cpu", {})
                cpu[stage_name] = round(cpu.get(stage_name, 0.0) + result[-1], 1)
            yield result[:-1]


def interval_percents() -> tuple:
    """INTERVAL_SIGMAS as ComfyUI start/end percents of the digits model's noise schedule."""
    from comfy_selfnpo.digits import model as dm

    sampling = dm.model_sampling()
    return tuple(round(dm.sigma_to_percent(s, sampling), 3) for s in INTERVAL_SIGMAS)


def prepare(setup, budget: Budget, timings: dict, log, reuse_base: bool):
    """Data, classifier and base model: (digits, reference, reference scores, base-model losses)."""
    from comfy_selfnpo.digits import metrics as qm

    with stage(timings, "data and classifier", log):
        digits = pipeline.split_digits(budget.per_class, budget.data_seed)
        classifier = qm.train_classifier(digits.train_images, digits.train_labels, seed=budget.data_seed,
                                         epochs=budget.classifier_epochs)
        reference = qm.Reference.from_images(classifier, digits.test_images)
        references = reference_scores(reference, digits, budget)
    with stage(timings, "base model", log):
        losses = pipeline.train_base_model(setup, digits, log, reuse=reuse_base)
    return digits, reference, references, losses


def run(budget: Budget, work_dir: Path, rows=ROWS, log=print, workers: int = 2, reuse_base: bool = False):
    """The whole benchmark. Returns (results: what quality.json holds, samples: (row name, g) ->
    the first seed's images [N, 8, 8], plus the held-out real digits under REAL)."""
    import torch
    from comfy_selfnpo.digits import model as dm

    torch.set_num_threads(budget.threads)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "workers": workers, "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    setup, timings, start = pipeline.Setup(str(work_dir), asdict(budget)), {}, time.perf_counter()
    digits, reference, references, base_losses = prepare(setup, budget, timings, log, reuse_base)
    interval = interval_percents()
    needed = [n for n in pipeline.NEGATIVES if any(r.negative == n for r in rows)]
    losses, done, samples = {"base": base_losses}, {}, {}
    with JobRunner(setup, workers, timings) as runner:
        with stage(timings, "negative models", log):
            for name, curve in runner.map(pipeline.train_negative_job, needed, "negative models"):
                losses[name] = curve
                log(f"  {name}: {len(curve)} steps, final loss {curve[-1]:.4g}")
        with stage(timings, "sampling and metrics", log):
            jobs = sample_jobs(rows, budget, interval)
            for job, images in runner.map(pipeline.sample_job, jobs, "sampling and metrics"):
                done[(job.row, job.g, job.seed)] = reference.score(images, digits.sample_labels)
                if job.seed == budget.seeds[0]:
                    samples[(job.row, job.g)] = images
            unguided, entries = collect(rows, budget, interval, done, log)
    timings["total"] = round(time.perf_counter() - start, 1)
    timings["cpu"]["total"] = round(sum(timings["cpu"].values()), 1)
    samples[(REAL, 1.0)] = digits.test_images[digits.test_labels.argsort(stable=True)]
    results = {
        "budget": asdict(budget), "machine": machine, "interval_percents": list(interval),
        "interval_sigmas": list(INTERVAL_SIGMAS), "unet_parameters": pipeline.unet_parameters(setup),
        "timings_s": timings, "references": references, "unguided": unguided, "rows": entries,
        "final_losses": {k: (v[-1] if v else None) for k, v in losses.items()},
    }
    results["best_fd"] = best_points(results)
    return results, samples


def reference_scores(reference, digits, budget: Budget) -> dict:
    """What the metrics give for real digits (a random training subset the size of the reference
    set) and for uniform noise: the scale the generated numbers are read against."""
    import torch

    gen = torch.Generator().manual_seed(budget.data_seed)
    order = torch.randperm(digits.train_labels.shape[0], generator=gen)  # random: the data come grouped by writer
    picks = torch.cat([order[digits.train_labels[order] == c][:budget.per_class] for c in range(10)])
    noise = torch.rand(digits.test_images.shape, generator=gen)
    return {"real_train_digits": reference.score(digits.train_images[picks], digits.train_labels[picks]),
            "real_test_digits_accuracy": reference.score(digits.test_images, digits.test_labels)["accuracy"],
            "uniform_noise": reference.score(noise, digits.test_labels)}


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
    """Per row, the point of its curve (g = 1 included) with the lowest mean FD: how good each
    method gets when g is tuned for it, the fair comparison between methods whose useful g differ."""
    out = []
    for row in results["rows"]:
        best = min([results["unguided"]] + row["points"], key=lambda p: p["fd"][0])
        out.append({"name": row["name"], **{k: v for k, v in best.items() if k != "per_seed"}})
    return out


def summary_table(results: dict) -> str:
    head = f"{'best FD over the g sweep':50} {'g':>4}  {'FD':>13}  {'precision':>13}  {'recall':>13}  {'accuracy':>13}"
    lines = [head, "-" * len(head)]
    for p in results["best_fd"]:
        lines.append(f"{p['name']:50} {p['g']:>4g}  " + "  ".join(f"{p[m][0]:7.3f}±{p[m][1]:<5.3f}" for m in METRICS))
    return "\n".join(lines)


def compare(fresh: dict, published: dict) -> tuple[float, list[str]]:
    """Every scored point of `published` against the same (row, g) of `fresh`: a metric matches when
    the two means differ by at most the larger of their standard errors. Returns the worst
    |difference| / allowance (0 when everything is identical) and a line per mismatch or missing point."""
    def points(results):
        out = {(UNGUIDED, 1.0): results["unguided"]}
        for row in results["rows"]:
            out.update({(row["name"], p["g"]): p for p in row["points"]})
        return out

    fresh_points, worst, problems = points(fresh), 0.0, []
    for key, old in points(published).items():
        new = fresh_points.get(key)
        if new is None:
            problems.append(f"{key[0]} g={key[1]:g}: missing from the fresh run")
            continue
        for metric in METRICS:
            difference, allowed = abs(new[metric][0] - old[metric][0]), max(new[metric][1], old[metric][1])
            if difference > allowed:
                problems.append(f"{key[0]} g={key[1]:g} {metric}: {new[metric][0]:.4g} now, "
                                f"{old[metric][0]:.4g} published (standard error {allowed:.3g})")
            if difference > 0:
                worst = max(worst, difference / allowed if allowed > 0 else float("inf"))
    return worst, problems


def paired_table(results: dict) -> str:
    """Each row minus plain CFG at the same g and noise seed, mean ± standard error over the seeds:
    the seeds share their noise, so the paired difference is far more precise than the two curves'
    own standard errors suggest."""
    from comfy_selfnpo.digits.metrics import mean_and_stderr

    cfg = {p["g"]: p for row in results["rows"] if row["name"] == "cfg" for p in row["points"]}
    head = f"{'difference to cfg at the same g and seed':50} {'g':>4}  " + "  ".join(f"{m:>13}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for row in results["rows"]:
        for p in row["points"] if row["name"] != "cfg" else ():
            cells = []
            for metric in METRICS:
                diffs = [a[metric] - b[metric] for a, b in zip(p["per_seed"], cfg[p["g"]]["per_seed"])]
                mean, err = mean_and_stderr(diffs)
                cells.append(f"{mean:+7.3f}±{err:<5.3f}")
            lines.append(f"{row['name']:50} {p['g']:>4g}  " + "  ".join(cells))
    return "\n".join(lines)


def shown_scale(budget: Budget) -> float:
    """The guidance scale the sample figure shows: the sweep's value closest to 3."""
    return min(budget.guidance_scales, key=lambda g: abs(g - 3.0))


def write_outputs(results: dict, samples: dict, out: Path) -> dict[str, Path]:
    import quality_plot
    from comfy_selfnpo.digits.model import image_grid

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "frontier": out / "quality_frontier.png",
             "samples": out / "quality_samples.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, paths["json"])
    quality_plot.frontier_figure(results).save(paths["frontier"])
    g = shown_scale(Budget.from_dict(results["budget"]))
    per_class = results["budget"]["per_class"]
    keep = [c * per_class + i for c in range(10) for i in range(min(2, per_class))]  # 2 of each class
    strips = [(REAL, samples[(REAL, 1.0)]), (UNGUIDED, samples[(UNGUIDED, 1.0)])]
    strips += [(f"{r['name']}, g = {g:g}", samples[(r["name"], g)]) for r in results["rows"]]
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
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for negative-model training and sampling (results do not depend on it)")
    parser.add_argument("--reuse-base", action="store_true",
                        help="development aid: keep the base model of an earlier run with the same budget in "
                             "the work folder instead of training it again (the wall time then leaves it out)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for quality.json and the figures")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the figure and JSON to docs/ (what the README shows)")
    parser.add_argument("--report", metavar="JSON",
                        help="print the tables of a saved quality.json (e.g. docs/quality_results.json) and exit")
    parser.add_argument("--check", metavar="JSON",
                        help="compare this run with a published quality.json; exit 1 when a point moved by more "
                             "than its standard error")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        boot_comfyui(cpu=True)
        print("\n\n".join((table(saved), summary_table(saved), paired_table(saved))))
        return 0
    published = json.loads(Path(args.check).read_text()) if args.check else None  # a bad path fails before the run
    boot_comfyui(cpu=True)
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    budget = BUDGETS[args.budget]
    out = Path(args.out)
    results, samples = run(budget, out / f"quality_work_{args.budget}", workers=args.workers,
                           reuse_base=args.reuse_base)
    results["budget_name"] = args.budget
    paths = write_outputs(results, samples, out)
    print(table(results))
    print(summary_table(results))
    print(paired_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.publish:
        publish(paths)
    if published is not None:
        worst, problems = compare(results, published)
        print(f"against {args.check}: largest difference {worst:.2f} standard errors")
        print("\n".join(problems) if problems else "every point within its standard error")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
