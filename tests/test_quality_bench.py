"""The quality benchmark (bench/quality.py) at a toy budget, end to end: real digits data, the digits
model trained through ComfyUI's UNet, the pack's real TDFT trainer and guidance, the metrics and the
figures. The metrics themselves are checked against hand-computable cases."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import quality  # noqa: E402
from comfy_selfnpo.digits import metrics as qm  # noqa: E402
import quality_pipeline as pipeline  # noqa: E402

from comfy_selfnpo.digits import model as digits_model  # noqa: E402


def test_frechet_distance_matches_the_scipy_formula():
    import scipy.linalg

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(300, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64) + 2.0
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    mu = a.numpy().mean(0) - b.numpy().mean(0)
    expected = mu @ mu + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert qm.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert qm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift by m adds |m|^2
    assert qm.frechet_distance(a, a + 3.0) == pytest.approx(9.0 * 6, rel=1e-9)


def test_precision_recall_on_a_hand_counted_case():
    # 20 real points 1/19 apart on a line; fake: copies of the first 10 real points and 10 points far
    # away. Precision: the 10 copies lie in real k-NN balls, the far ones in none -> 0.5. Recall: a copy's
    # 3rd neighbour among the fakes is 3/19 away, so real points up to index 9 + 3 are covered -> 13/20.
    real = torch.stack([torch.arange(20) / 19.0, torch.zeros(20)], dim=1).double()
    far = torch.stack([100.0 + 10.0 * torch.arange(10), torch.zeros(10)], dim=1).double()
    fake = torch.cat([real[:10], far])
    precision, recall = qm.precision_recall(real, fake, k=3)
    assert precision == pytest.approx(0.5)
    assert recall == pytest.approx(13 / 20)


def test_mean_and_stderr():
    assert qm.mean_and_stderr([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, (14 / 3 / 4) ** 0.5))
    assert qm.mean_and_stderr([5.0]) == (5.0, 0.0)


def test_digit_latents_round_trip_and_fill_all_channels():
    images, labels = pipeline.load_digits_images()
    assert images.shape == (1797, 8, 8) and float(images.max()) == 1.0 and set(labels.tolist()) == set(range(10))
    latents = digits_model.images_to_latents(images[:5])
    assert latents.shape == (5, 4, 8, 8) and float(latents.min()) == -1.0
    assert torch.equal(latents[:, 0], latents[:, 3])
    assert torch.allclose(digits_model.latents_to_images(latents), images[:5])


def test_quality_benchmark_runs_end_to_end_at_a_toy_budget(tmp_path):
    budget = replace(quality.BUDGETS["toy"], guidance_scales=(2.0, 4.0), seeds=(0,))
    messages = []
    # two worker processes, as the benchmark runs by default
    results, samples = quality.run(budget, tmp_path / "work", log=messages.append, workers=2)
    paths = quality.write_outputs(results, samples, tmp_path)

    saved = json.loads(paths["json"].read_text())
    assert saved["budget"]["guidance_scales"] == [2.0, 4.0]
    assert [r["name"] for r in saved["rows"]] == [r.name for r in quality.ROWS]
    # the judge: the classifier reads held-out real digits; real digits are far closer to the
    # held-out set than noise is, in every metric
    refs = saved["references"]
    assert refs["real_test_digits_accuracy"] > 0.9
    real, noise = refs["real_train_digits"], refs["uniform_noise"]
    assert real["fd"] < noise["fd"] / 4
    assert real["precision"] > 0.6 > noise["precision"] and real["recall"] > 0.5 > noise["recall"]
    assert real["accuracy"] > 0.9 and noise["accuracy"] < 0.3

    by_name = {r["name"]: r for r in saved["rows"]}  # every row scored: every mode and interval ran
    for row in saved["rows"]:
        assert [p["g"] for p in row["points"]] == [2.0, 4.0]
        for p in row["points"]:
            assert 0 <= p["precision"][0] <= 1 and 0 <= p["recall"][0] <= 1 and 0 <= p["accuracy"][0] <= 1
            assert p["fd"][0] > 0 and p["fd"][1] == 0.0  # one seed: no spread
    # the negative models really change the samples: every guided row differs from plain CFG
    cfg_fd = [p["fd"][0] for p in by_name["cfg"]["points"]]
    for name, row in by_name.items():
        if name != "cfg":
            assert [p["fd"][0] for p in row["points"]] != cfg_fd, name
    assert not torch.equal(samples[("cfg", 4.0)], samples[("npo · Self-NPO data-free", 4.0)])
    # a job gives the same images in this process as it gave in a worker: the results do not depend
    # on the number of workers
    pipeline.init_worker(pipeline.Setup(str(tmp_path / "work"), quality.asdict(budget)), boot=False)
    try:
        for row in ("cfg", "npo · fine-tune control"):
            negative = next(r.negative for r in quality.ROWS if r.name == row)
            job, images, _cpu = pipeline.sample_job(pipeline.SampleJob(row, negative, (), 4.0, 0))
            assert torch.equal(images, samples[(row, 4.0)])
    finally:
        pipeline.WORKER.clear()

    frontier = Image.open(paths["frontier"])
    assert frontier.width > 1000 and frontier.height > 400
    strips = 2 + len(saved["rows"])  # real digits, no guidance, one per row
    assert Image.open(paths["samples"]).height > strips * 8 * 4
    best = {p["name"]: p for p in saved["best_fd"]}
    assert set(best) == set(by_name)
    for name, p in best.items():  # the lowest FD of the row's curve, g = 1 included
        curve = [saved["unguided"]["fd"][0]] + [q["fd"][0] for q in by_name[name]["points"]]
        assert p["fd"][0] == min(curve)
    text = quality.table(saved) + quality.summary_table(saved)
    paired = quality.paired_table(saved).splitlines()
    npo = by_name["npo · Self-NPO data-free"]["points"][1]
    difference = npo["fd"][0] - by_name["cfg"]["points"][1]["fd"][0]
    line = next(l for l in paired if l.startswith("npo · Self-NPO data-free ") and " 4  " in l)
    assert f"{difference:+7.3f}±0.000" in line
    assert all(r["name"] in text for r in saved["rows"]) and "wall time" in text
    assert any("base model" in m for m in messages)


def test_check_against_published_results_flags_a_point_moved_beyond_its_standard_error():
    def results(fd_cfg):
        def p(g, fd):
            return {"g": g, "fd": [fd, 1.0], "precision": [0.9, 0.01], "recall": [0.8, 0.02], "accuracy": [0.95, 0.0]}
        return {"unguided": p(1.0, 30.0), "rows": [{"name": "cfg", "points": [p(2.0, fd_cfg)]},
                                                    {"name": "a row without points", "points": []}]}

    assert quality.compare(results(20.0), results(20.0)) == (0.0, [])
    worst, problems = quality.compare(results(20.5), results(20.0))  # half a standard error
    assert worst == pytest.approx(0.5) and problems == []
    worst, problems = quality.compare(results(22.5), results(20.0))
    assert worst == pytest.approx(2.5) and len(problems) == 1 and problems[0].startswith("cfg g=2 fd: 22.5 now")
    missing = results(20.0)
    missing["rows"][0]["points"] = []
    assert quality.compare(missing, results(20.0))[1] == ["cfg g=2: missing from the fresh run"]


# ------------------------------------------------------------------ the demo's shipped digits model

def test_the_demo_repeats_the_benchmark_s_negative_model_and_sampling():
    from comfy_selfnpo.digits import demo
    from comfy_selfnpo.training import cli
    from comfy_selfnpo.training.settings import build_config

    budget = quality.BUDGETS["full"]
    config = build_config(cli.DEMO_PRESET, cli.DEMO_OVERRIDES)
    assert (config.steps, config.batch_size * config.grad_accum, config.learning_rate, config.trajectory_buffer) == (
        budget.npo_steps, budget.npo_batch, budget.npo_lr, budget.npo_buffer)
    assert config.mode == "full" and config.resolution == 64 and config.optimizer == "adamw"  # the 8x8 digit latent
    assert demo.DEMO_CFG in budget.guidance_scales
    assert (demo.DEMO_PER_CLASS, demo.DEMO_SAMPLING_STEPS) == (budget.per_class, budget.sampling_steps)


def test_the_shipped_demo_model_matches_this_version_and_judges_real_digits():
    from comfy_selfnpo.digits import demo
    from comfy_selfnpo.digits import metrics

    shipped = demo.load_demo_model()  # raises when the tiny CLIP no longer encodes its prompts so
    budget = quality.BUDGETS["full"]
    digits = pipeline.split_digits(budget.per_class, budget.data_seed)
    # its reference features are the classifier's features of the benchmark's held-out split
    features, predicted = metrics.classify(shipped.judge.classifier, digits.test_images)
    assert torch.allclose(features, shipped.judge.features, atol=1e-4)
    assert float((predicted == digits.test_labels).double().mean()) > 0.95
    scale = quality.reference_scores(shipped.judge, digits, budget)  # real training digits vs uniform noise
    assert scale["real_train_digits"]["accuracy"] > 0.95 and scale["real_train_digits"]["fd"] < 20
    assert scale["uniform_noise"]["fd"] > 10 * scale["real_train_digits"]["fd"]


def test_a_missing_or_outdated_demo_model_is_refused_with_the_command_that_remakes_it(tmp_path):
    import safetensors.torch
    from comfy_selfnpo.digits import demo

    with pytest.raises(demo.DemoModelError, match="missing.*make_digits_demo_model.py"):
        demo.load_demo_model(tmp_path / "nothing.safetensors")
    tensors = safetensors.torch.load_file(str(demo.DEMO_MODEL))
    with __import__("safetensors").safe_open(str(demo.DEMO_MODEL), "pt") as f:
        metadata = f.metadata()
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"] + 0.1  # as if another CLIP had encoded them
    outdated = tmp_path / "outdated.safetensors"
    safetensors.torch.save_file(tensors, str(outdated), metadata=metadata)
    with pytest.raises(demo.DemoModelError, match="another version of the tiny CLIP.*make_digits_demo_model.py"):
        demo.load_demo_model(outdated)
