"""The TDFT step (training/tdft.py) against the authors' recipe, written out here in their own DDPM
terms; the Gaussian-toy theory check (Eq. 16 vs Eq. 15); data-free mode against image mode."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import comfy.model_sampling
from comfy_selfnpo.training import tdft
from comfy_selfnpo.training.errors import UnsupportedModel
from comfy_selfnpo.training.distributed import LocalWorld
from comfy_selfnpo.training.draws import ItemRandom
from comfy_selfnpo.training.encoding import EncodedData
from comfy_selfnpo.training.trajectories import TrajectoryStarts


T = 1000


# ------------------------------------------------------------------ the authors' loop, restated


def authors_alphas_cumprod(kind, model_sampling):
    """ᾱ_t as the authors' DDPM code has it. SD (EPS/V): diffusers' scaled_linear betas
    (0.00085 … 0.012), computed here independently of ComfyUI. Flow: the VP process equivalent to
    x = (1 − σ)x0 + σε, i.e. ᾱ = a²/(a² + b²)."""
    if kind == "flow":
        sig = model_sampling.sigmas.double()
        a, b = 1 - sig, sig
        return a * a / (a * a + b * b)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def authors_reference_step(kind, base_model, x0, ctx, uctx, rng, N, K, w, huber_c=0.001):
    """A transcription of Self-NPO/train.py's step (DDIMSolver, predicted_origin, nsr re-noising,
    both teacher branches always evaluated, rows masked once they reach t = 0), using the VP state
    x_vp = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε and the network's raw output (ε, v or flow velocity).
    Random draws per item in the order training/tdft.py documents (index, ε, u, ε′), from `rng`, a
    draws.ItemRandom replaying the trainer's per-item streams."""
    ac = authors_alphas_cumprod(kind, base_model.model_sampling)
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()  # the authors' alpha_schedule / sigma_schedule
    net = base_model.diffusion_model
    B = x0.shape[0]

    def col(v, t):  # per row, broadcast over image [C, H, W] or video [C, T, H, W] latents
        return v[t].view((-1,) + (1,) * (x0.ndim - 1))

    def unet_x0_eps(x_vp, t, context):
        """Raw network call + the authors' conversions to (x0, ε)."""
        if kind == "flow":  # the network sees the flow state and timestep 1000·σ
            sig = col(base_model.model_sampling.sigmas.double(), t)
            x_flow = x_vp * ((1 - sig) ** 2 + sig ** 2).sqrt()
            dtype = next(net.parameters()).dtype  # float64, or float32 where the network insists (Wan)
            out = net(x_flow.to(dtype), (sig.flatten() * 1000).to(dtype), context=context.to(dtype)).double()
            x0_hat = x_flow - sig * out
            eps = (x_vp - col(alpha, t) * x0_hat) / col(sigma, t)
            return x0_hat, eps
        out = net(x_vp, t.double(), context=context).double()
        if kind == "eps":
            return (x_vp - col(sigma, t) * out) / col(alpha, t), out
        # v-prediction: x0 = α·x − σ·v, ε = σ·x + α·v
        return col(alpha, t) * x_vp - col(sigma, t) * out, col(sigma, t) * x_vp + col(alpha, t) * out

    step_ratio = T // N
    ddim_timesteps = torch.arange(1, N + 1) * step_ratio - 1
    ac_prev = torch.cat([ac[:1], ac[ddim_timesteps[:-1]]])  # DDIMSolver.ddim_alpha_cumprods_prev

    index = rng.randint(N)
    noise = rng.randn(x0.shape[1:]).double()
    start_t = ddim_timesteps[index]
    x = col(alpha, start_t) * x0.double() + col(sigma, start_t) * noise  # noise_scheduler.add_noise
    t_cur, mask = start_t.clone(), torch.ones(B, dtype=torch.float64)
    with torch.no_grad():
        for i in range(K + 1):
            c_x0, c_eps = unet_x0_eps(x, t_cur, ctx)
            u_x0, u_eps = unet_x0_eps(x, t_cur, uctx)
            pred_x0 = c_x0 + w * (c_x0 - u_x0)
            if i >= K:
                break
            pred_eps = c_eps + w * (c_eps - u_eps)
            a_prev = col(ac_prev, index)
            x_new = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_eps  # ddim_step
            m = mask.view((-1,) + (1,) * (x0.ndim - 1))
            x = x_new * m + x * (1 - m)
            index = index - 1
            mask = torch.where(index < 0, 0.0, mask)
            index = index.clamp_min(0)
            t_cur = (t_cur - step_ratio).clamp_min(0)
    x_prev, t_e, target = x, t_cur, pred_x0
    u = rng.rand()
    t = t_e + 1 + torch.floor(u * (T - 1 - t_e)).long()
    nsr_e, nsr_t = col(sigma, t_e) / col(alpha, t_e), col(sigma, t) / col(alpha, t)
    noise2 = rng.randn(x0.shape[1:]).double()
    x_t = (x_prev / col(alpha, t_e) + (nsr_t ** 2 - nsr_e ** 2).sqrt() * noise2) * col(alpha, t)
    with torch.no_grad():
        pred, _ = unet_x0_eps(x_t, t, ctx)
    loss = torch.mean(torch.sqrt((pred - target) ** 2 + huber_c ** 2) - huber_c)
    return dict(t_s=start_t, t_e=t_e, x_e=x_prev, target=target, t=t, x_t=x_t, pred=pred, loss=loss,
                ac=ac)


def _vp_to_comfy(kind, x_vp, ac, t, model_sampling):
    """x_comfy = a_t·x̃ with x̃ = x_vp / sqrt(ᾱ_t) (SPEC §2): a = 1 (EPS/V) or 1 − σ (flow)."""
    shape = (-1,) + (1,) * (x_vp.ndim - 1)
    x_tilde = x_vp / ac[t].sqrt().view(shape)
    if kind == "flow":
        return x_tilde * (1 - model_sampling.sigmas.double()[t]).view(shape)
    return x_tilde


def _seed_with_a_row_reaching_zero(N, K, B):
    """A seed whose start draws include a row that hits t = 0 during the rollout and one that does
    not, so both branches of the authors' mask are exercised."""
    for seed in range(1000):
        index = ItemRandom(seed, 0, 0, range(B)).randint(N)
        if (index < K - 1).any() and (index >= K).any():
            return seed
    raise AssertionError("no seed found")


@pytest.mark.parametrize("kind_name,kind,w", [("sd15", "eps", -1.0), ("sd15", "eps", -5.0),
                                              ("sd2", "v", -5.0), ("sd2", "v", -1.0),
                                              ("flow", "flow", -1.0), ("flow", "flow", -5.0),
                                              ("wan21", "flow", -1.0), ("wan21", "flow", -5.0)])
def test_one_step_equals_the_authors_ddpm_reference(tiny, kind_name, kind, w):
    """Also on a video model's 5-D latents [B, C, T, H, W] (Wan 2.1)."""
    model = tiny.build_model(kind_name, seed=3).model
    # float64 on both sides, so the comparison measures the algorithm, not float32 rounding (at
    # σ ≈ 14.6 an ε-prediction's rounding is amplified 15-fold in x0); Wan embeds its input in float32
    # whatever it is given, so it runs in float32 (a flow x0 = x − σ·v amplifies nothing)
    exact = kind_name != "wan21"
    if exact:
        model.diffusion_model.double()
        model.diffusion_model.dtype = torch.float64
    clip = tiny.build_clip(kind_name, seed=4)
    ctx = torch.cat([clip.encode_from_tokens(clip.tokenize(p)) for p in
                     ("a red cube", "a blue ball", "a dog", "a cat", "a tree", "a house")]).double()
    uctx = clip.encode_from_tokens(clip.tokenize("")).expand_as(ctx).clone().double()
    N, K, B = 10, 3, 6
    latent = tiny.family(kind_name).sample_latent[1:]  # [4, 8, 8] or, for Wan, [16, 2, 8, 8]
    x0 = torch.randn((B,) + tuple(latent), generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 0.8
    seed = _seed_with_a_row_reaching_zero(N, K, B)
    schedule = tdft.NoiseSchedule.from_model_sampling(model.model_sampling)
    assert schedule.kind == ("flow" if kind == "flow" else "vp")

    def denoise(x, t, cond):
        return model.apply_model(x, schedule.sigma(t), c_crossattn=cond["c_crossattn"])

    calls = []

    def counting_teacher(x, t, cond):
        calls.append(x.shape[0])
        return denoise(x, t, cond)

    grid = tdft.ddim_grid(T, N)
    with torch.no_grad():
        rng = ItemRandom(seed, 0, 0, range(B))
        start = tdft.noised_start(schedule, grid, x0, {"c_crossattn": ctx}, rng, K)
        trace = tdft.tdft_step(denoise, counting_teacher, schedule, grid, start, {"c_crossattn": uctx}, rng,
                               w=w, loss="huber", huber_c=0.001)
        ref = authors_reference_step(kind, model, x0, ctx, uctx, ItemRandom(seed, 0, 0, range(B)), N, K, w)

    ms = model.model_sampling
    assert torch.equal(trace.t_s, ref["t_s"])
    assert torch.equal(trace.t_e, ref["t_e"])
    assert torch.equal(trace.t, ref["t"])
    assert (trace.t_e == 0).any() and (trace.t_e > 0).any()
    assert (trace.t > trace.t_e).all() and (trace.t <= T - 1).all()
    close = dict(rtol=1e-5, atol=1e-5) if exact else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trace.x_e.double(), _vp_to_comfy(kind, ref["x_e"], ref["ac"], ref["t_e"], ms), **close)
    torch.testing.assert_close(trace.target.double(), ref["target"], **close)
    torch.testing.assert_close(trace.x_t.double(), _vp_to_comfy(kind, ref["x_t"], ref["ac"], ref["t"], ms), **close)
    torch.testing.assert_close(trace.pred.double(), ref["pred"], **close)
    torch.testing.assert_close(trace.loss.double(), ref["loss"], **close)
    assert trace.loss > 0
    # cost: rows that reached t = 0 are not re-evaluated; w = −1 runs one branch, otherwise both
    index = ItemRandom(seed, 0, 0, range(B)).randint(N)
    expected_rows = int((torch.clamp(index + 1, max=K) + 1).sum())
    assert trace.teacher_evaluations == expected_rows
    assert sum(calls) == expected_rows * (1 if w == -1.0 else 2)


def test_trainer_step_runs_exactly_this_step(tiny, tmp_path):
    """The trainer's first step (one image, batch 1) has the loss of tdft_step on its cached latent
    with its seed's draws for step 0, item 0: the trainer really runs the tested math."""
    from PIL import Image

    from comfy_selfnpo.training import TDFTTrainer, make_config
    from comfy_selfnpo.training.conditioning import forward_by_constants
    from comfy_selfnpo.training.data import ImageCaptionFolder

    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray((torch.rand(72, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()).save(folder / "a.png")
    (folder / "a.txt").write_text("a red cube")
    ckpt = tiny.build_checkpoint("sd15", seed=3)
    cfg = make_config(mode="full", teacher="base", resolution=64, batch_size=1, seed=5, grid_size=10,
                      truncation_steps=3, corruption_guidance=-5.0, learning_rate=1e-4)
    trainer = TDFTTrainer(ckpt.model, ckpt.clip, ckpt.vae, ImageCaptionFolder(folder, 64), cfg, tmp_path / "w")
    result = trainer.train_step()
    model = ckpt.model.model
    schedule = tdft.NoiseSchedule.from_model_sampling(model.model_sampling)

    def denoise(x, t, cond):
        return forward_by_constants(lambda x, s, c: model.apply_model(x, s, **c), x, schedule.sigma(t), cond)

    grid = tdft.ddim_grid(T, 10)
    with torch.no_grad():
        rng = ItemRandom(5, 0, 0, [0])
        start = tdft.noised_start(schedule, grid, trainer.encoded.latents[[0]], trainer.encoded.conds([0], "cpu"),
                                  rng, 3)
        trace = tdft.tdft_step(denoise, denoise, schedule, grid, start, trainer.encoded.unconds(1, "cpu"), rng, w=-5.0)
    assert trainer.encoded.latents.shape == (1, 4, 8, 8)
    assert result.loss == pytest.approx(float(trace.loss), rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------ Gaussian toy theory check


class _EPSDiscrete(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    pass


def _toy_fit(N, K, levels, n=120_000, seed=0, mu=0.7, s=0.5):
    """Data N(μ, s²) (scalar per sample), the exact posterior-mean denoiser as teacher (w = −1, no
    conditioning), TDFT draws; per student level t the least-squares fit target ≈ α + β·x_t, for
    re-noising x_e (Eq. 16) and x̂0 (Eq. 15). Returns {t: (β16, β15, β_exact)}."""
    schedule = tdft.NoiseSchedule.from_model_sampling(_EPSDiscrete())

    def exact_denoiser(x, t, cond):
        var = schedule.sigmas[t.cpu()].to(x.dtype).view(-1, 1) ** 2
        return mu + s * s / (s * s + var) * (x - mu)

    g = torch.Generator().manual_seed(seed)
    x0 = mu + s * torch.randn(n, 1, generator=g, dtype=torch.float64)
    grid = tdft.ddim_grid(T, N)
    index = torch.randint(0, N, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_s = tdft.noise_to(schedule, x0, grid[index], noise)
    roll = tdft.teacher_rollout(exact_denoiser, schedule, grid, x_s, index, K, -1.0, {}, {})
    out = {}
    for t in levels:
        keep = roll.t_e < t
        tt = torch.full((int(keep.sum()),), t)
        eps = torch.randn(int(keep.sum()), 1, generator=g, dtype=torch.float64)
        x_t16 = tdft.renoise(schedule, roll.x_e[keep], roll.t_e[keep], tt, eps)
        x_t15 = tdft.noise_to(schedule, roll.target[keep], tt, eps)  # Eq. 15: noise the estimate
        betas = []
        for x_t in (x_t16, x_t15):
            X = torch.cat([torch.ones_like(x_t), x_t], 1)
            betas.append(float(torch.linalg.lstsq(X, roll.target[keep]).solution[1]))
        sigma_t = float(schedule.sigmas[t])
        out[t] = (betas[0], betas[1], s * s / (s * s + sigma_t ** 2))
    return out


def test_gaussian_toy_tdft_regression_recovers_the_posterior_mean_and_eq15_does_not():
    levels = (300, 500, 700)  # at low levels the teacher's x̂0 ≈ x0 and the two variants agree
    # fine grid: the teacher's DDIM discretisation error is negligible, so Eq. 16 is exact up to
    # Monte-Carlo noise while Eq. 15 (noising the shrunk estimate x̂0) is biased by ~30% or more
    fine = _toy_fit(N=200, K=5, levels=levels)
    for t, (b16, b15, exact) in fine.items():
        assert abs(b16 / exact - 1) < 0.02, (t, b16, exact)
        assert abs(b15 / exact - 1) > 0.25, (t, b15, exact)
    # the authors' grid (N = 25): Eq. 16 stays within a few % (DDIM error of the K-step rollout),
    # Eq. 15 is off by several times as much
    coarse = _toy_fit(N=25, K=5, levels=levels)
    for t, (b16, b15, exact) in coarse.items():
        assert abs(b16 / exact - 1) < 0.07, (t, b16, exact)
        assert abs(b15 / exact - 1) > 4 * abs(b16 / exact - 1), (t, b15, b16, exact)


# ------------------------------------------------------------------ data-free vs image mode


def test_data_free_buffer_covers_the_noise_levels_like_image_mode():
    """Gaussian toy: the trajectory buffer (data-free) visits every truncation level of image mode
    with comparable frequency, and its truncated states have the image-mode statistics at each level."""
    mu, s, N, K, B = 0.3, 0.6, 25, 5, 8
    schedule = tdft.NoiseSchedule.from_model_sampling(_EPSDiscrete())
    grid = tdft.ddim_grid(T, N)

    def exact_denoiser(x, t, cond):
        var = schedule.sigmas[t.cpu()].to(x.dtype).view(-1, *([1] * (x.ndim - 1))) ** 2
        return mu + s * s / (s * s + var) * (x - mu)

    g = torch.Generator().manual_seed(0)
    # image mode: real samples noised to a grid level, K teacher steps
    n = 40_000
    x0 = mu + s * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    index = torch.randint(0, N, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    image = tdft.teacher_rollout(exact_denoiser, schedule, grid, tdft.noise_to(schedule, x0, grid[index], noise),
                                 index, K, -1.0, {}, {})
    # data-free: 64 trajectories, B per step, continued K steps per use (prompts carry no conditioning)
    encoded = EncodedData(latents=None, item_conds=[{}, {}, {}], uncond={}, latent_shape=(1, 1, 1), repeats=[1, 1, 1])
    config = SimpleNamespace(seed=0, corruption_guidance=-1.0, truncation_steps=K, batch_size=B, trajectory_buffer=64)
    buf = TrajectoryStarts(encoded, schedule, grid, config, LocalWorld(), "cpu")
    buf.prepare(exact_denoiser)
    free_t, free_x = [], []
    for step in range(2500):
        start = buf.next_batch(ItemRandom(0, step, 0, range(B)), step, 0)
        roll = tdft.teacher_rollout(exact_denoiser, schedule, grid, start.x, start.index, start.steps, -1.0, {}, {})
        free_t.append(roll.t_e)
        free_x.append(roll.x_e.flatten())
        buf.after_rollout(roll, step, 0)
    free_t, free_x = torch.cat(free_t), torch.cat(free_x)
    image_levels = set(image.t_e.tolist())
    free_levels = set(free_t.tolist())
    assert image_levels <= free_levels, sorted(image_levels - free_levels)  # every level is trained
    for level in sorted(image_levels - {0}):
        share = float((free_t == level).double().mean())
        assert share > 0.3 / N, (level, share)  # no level starved (uniform would be ~1/N)
        # the truncated states at this level: mean and spread match image mode and the true marginal
        xf, xi = free_x[free_t == level], image.x_e.flatten()[image.t_e == level]
        sd_true = (s * s + float(schedule.sigmas[level]) ** 2) ** 0.5
        assert abs(float(xf.mean()) - mu) < 0.15 * sd_true, level
        assert abs(float(xf.std()) / float(xi.std()) - 1) < 0.15, (level, float(xf.std()), float(xi.std()))
    # a K-step lattice alone (no random first continuation) would visit only ceil(N/K) levels
    assert len(free_levels) > (N + K - 1) // K + 2


def test_unsupported_model_kinds_get_a_clear_error():
    class EDM(comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EDM):
        pass

    with pytest.raises(UnsupportedModel, match="SD1.x, SD2.x"):
        tdft.NoiseSchedule.from_model_sampling(EDM())
