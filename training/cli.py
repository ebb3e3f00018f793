"""`comfy-selfnpo-train`: headless Self-NPO (TDFT) training on a checkpoint ComfyUI can load.

Loads the model through ComfyUI's own loaders and memory management without starting the server
(GPU when present, CPU otherwise), trains with `TDFTTrainer` through the same `TrainingSession` the
node uses, and leaves in the output folder: the weights, a resumable checkpoint, loss.csv, loss.png,
preview PNGs and summary.json. Exit statuses: `EXIT_CODES` below (also in `--help`).

Several GPUs or machines: start it with torchrun (`torchrun --nproc-per-node N -m
comfy_selfnpo.training.cli ...`); every process trains its share of each batch (distributed.py) and
only the first writes files.

Test/demo only: with COMFY_SELFNPO_TINY_MODELS=1 in the environment the tiny model configs of
`tiny_models/` are registered with ComfyUI's detector, so the tiny checkpoints the test suite
writes load like real ones. Never needed for real checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INPUT, EXIT_NONFINITE, EXIT_OOM, EXIT_WRITE, EXIT_LOST = 0, 1, 2, 3, 4, 5, 6, 7
EXIT_EXISTS, EXIT_MISMATCH = 8, 9
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
EXIT_CODES = {
    EXIT_OK: "success", EXIT_ERROR: "unexpected error (a bug: please report it with the traceback)",
    EXIT_USAGE: "bad arguments or config (also: the processes of a torchrun job were started with different "
                "models, data or settings)", EXIT_INPUT: "unusable input (model file, data, damaged checkpoint)",
    EXIT_NONFINITE: "the loss became NaN/inf", EXIT_OOM: "out of memory",
    EXIT_WRITE: "output not writable / disk full",
    EXIT_LOST: "another process of a torchrun job was lost (it died, or the network failed)",
    EXIT_EXISTS: "the output folder already holds a checkpoint (continue it with --resume, or start over with "
                 "another --output/--name)",
    EXIT_MISMATCH: "resume refused: this run differs from the checkpoint's in settings that stay fixed within a "
                   "run (each is named; the checkpoint is kept)",
    130: "stopped by SIGINT (Ctrl+C), resumable checkpoint saved", 143: "stopped by SIGTERM, likewise",
}
TINY_MODELS_ENV = "COMFY_SELFNPO_TINY_MODELS"

# The demo makes a data-free Self-NPO negative model of the built-in handwritten-digits model
# (digits/demo.py) as the quality benchmark makes it: the SD1.5 recipe, full weights, at the
# benchmark's budget (bench/quality_pipeline.py Budget.npo_*; a test keeps the two equal). About
# two minutes on a laptop CPU.
DEMO_PRESET = "sd15"
DEMO_OVERRIDES = dict(steps=300, batch_size=32, grad_accum=1, learning_rate=2e-5, trajectory_buffer=64,
                      resolution=64, mixed_precision="no", gradient_checkpointing=False, output_format="offset",
                      optimizer="adamw")

log = logging.getLogger("comfy_selfnpo.cli")


class UsageError(Exception):
    pass


# ------------------------------------------------------------------ arguments

def _default_text(name: str) -> str:
    """What a run uses when the flag is not given: the default preset's value, the model family's
    recipe (said by describe()), or the TDFT default."""
    from .config import DEFAULT_PRESET, PRESETS, TDFTConfig, recipe_fields

    if name in PRESETS[DEFAULT_PRESET]:
        return f"; default {PRESETS[DEFAULT_PRESET][name]} (preset {DEFAULT_PRESET})"
    return "" if name in recipe_fields() else f"; default {getattr(TDFTConfig(), name)}"


def _add_hyperparameter_flags(parser) -> None:
    """One flag per TDFTConfig field; help text and choices come from the field's own description."""
    from .config import choices_of, describe, field_types

    hp = parser.add_argument_group("hyper-parameters (TDFTConfig; see README)")
    for name, kind in field_types().items():
        flag = "--" + name.replace("_", "-")
        text = describe(name) + _default_text(name)
        if kind is bool:
            hp.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif choices_of(name):
            hp.add_argument(flag, choices=list(choices_of(name)), default=None, help=text)
        else:
            hp.add_argument(flag, type=kind, default=None, metavar=kind.__name__.upper(), help=text)
    hp.add_argument("--lr", dest="learning_rate", type=float, default=None, help="alias of --learning-rate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comfy-selfnpo-train",
        description="Train a Self-NPO negative model with truncated diffusion fine-tuning (TDFT), "
                    "using ComfyUI's loaders and memory management, without starting the server.",
        epilog="Every hyper-parameter flag defaults to the preset's value, else to the loaded model family's "
               "recipe (corruption guidance, unconditional input, resolution, crop, learning rate, weight decay: "
               "the authors' for SD1.x/SD2 and SDXL), else the TDFT default. Precedence: flags > --config file > "
               "--preset > the family's recipe > defaults; --print-config shows what a run would use. Exit status: "
               + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    )
    _add_model_and_data_flags(parser)
    _add_output_flags(parser)
    _add_run_flags(parser)
    _add_hyperparameter_flags(parser)
    parser.set_defaults(**{a.dest: None for a in parser._actions if a.dest != "help"})
    return parser


def _add_model_and_data_flags(parser) -> None:
    model = parser.add_argument_group("model (loaded with ComfyUI's loaders)")
    model.add_argument("--checkpoint", "--ckpt", help="single-file checkpoint (SD1.5, SDXL, ...) with MODEL, CLIP and VAE")
    model.add_argument("--diffusion-model", help="diffusion model (UNet / DiT) file; replaces the checkpoint's")
    model.add_argument("--text-encoder", action="append", help="text encoder file (repeat for SDXL: CLIP-L and CLIP-G)")
    model.add_argument("--clip-type", help="ComfyUI CLIPType for --text-encoder (default stable_diffusion, "
                       "which also covers SD2 and SDXL; sd3, wan, flux, chroma, ltxv, qwen_image, lumina2, ...)")
    model.add_argument("--vae", help="VAE file (needed for --data images when the checkpoint has none)")
    model.add_argument("--shift", type=float, help="flow models: the timestep shift to sample and train with, as "
                       "ComfyUI's ModelSamplingSD3/Flux nodes set it (default: the model's own)")
    data = parser.add_argument_group("data (one of)")
    data.add_argument("--data", help="folder of images (video models: also clips, .mp4/.webm/.gif) with same-name "
                      ".txt captions (kohya layout)")
    data.add_argument("--prompts", help="text file, one prompt per line (prompt-only mode, this pack's extension); "
                      "neither --data nor --prompts: the pack's default list of prompts")
    data.add_argument("--caption-extension", help="caption file extension (default .txt)")


def _add_output_flags(parser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", help="run folder: weights, checkpoint, logs, previews (default ./selfnpo-run, "
                     "./selfnpo-demo with --demo)")
    out.add_argument("--name", help="weights file name without extension (default self_npo)")
    out.add_argument("--resume", action="store_true", default=None,
                     help="continue the checkpoint in the output folder (same model, data and hyper-parameters; "
                          "steps, learning rate and schedule, gradient clipping and save cadence may change)")
    out.add_argument("--allow-data-change", action="store_true", default=None,
                     help="with --resume: accept data whose content changed since the checkpoint (e.g. fixed "
                          "captions); by default that is refused")
    out.add_argument("--preview-every", type=int, help="sample CFG vs NPO-CFG previews every N steps (0 = never)")
    out.add_argument("--preview-prompt", help="prompt of the previews (default: the first prompt/caption)")
    out.add_argument("--sample-prompts", help="previews of several prompts (a row each), kohya's sample-prompt file: "
                     "one prompt per line, optionally with --n <negative> --d <seed> --l <cfg> --s <steps>")
    out.add_argument("--tensorboard", help="also log loss, learning rate and previews for TensorBoard into this "
                     "folder (needs the tensorboard extra)")
    out.add_argument("--preview-steps", type=int, help="sampling steps of a preview (default 20)")
    out.add_argument("--preview-cfg", type=float,
                     help="CFG scale of the previews and of the demo grid (default 7.0; 1.5 with --demo)")


def _add_run_flags(parser) -> None:
    from .config import DEFAULT_PRESET, PRESETS

    run = parser.add_argument_group("run")
    run.add_argument("--config", help="TOML file with any of these options (names with _ or -), for repeatable runs")
    run.add_argument("--preset", choices=sorted(PRESETS), help=f"memory preset (default {DEFAULT_PRESET}, as the "
                     "training node): sd15/sdxl the authors' published runs (full, 8-bit AdamW, their batch), "
                     "lora-8gb/12gb/16gb/24gb sized for consumer GPUs; never changes the model family's recipe")
    run.add_argument("--print-config", action="store_true", default=None,
                     help="load the model, print the fully resolved configuration as TOML (--config reads it "
                          "back) and exit")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto (default): the GPU ComfyUI finds, else CPU")
    run.add_argument("--demo", action="store_true", default=None,
                     help="train a Self-NPO negative model of the built-in handwritten-digits model (about two "
                          "minutes on a CPU) and write a CFG vs NPO-CFG grid with measured quality")
    run.add_argument("--plan", action="store_true", default=None,
                     help="print the predicted peak GPU memory and compute of a training step of this model and "
                          "config (one step run on fake tensors: works on any machine, needs no --data), then exit")
    run.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
    run.add_argument("--verbose", "-v", action="store_true", default=None, help="log what the trainer does")
    run.add_argument("--dist-timeout", type=float,
                     help="torchrun jobs: seconds a process waits for the others in a collective before "
                          "giving up (default: torch's, 30 min); a lost process ends the job within it")


def apply_toml(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill options not given on the command line from the --config TOML file."""
    if not args.config:
        return
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the backport, a dependency there
        import tomli as tomllib

    from .config import field_types
    from .settings import check_overrides

    path = Path(args.config).expanduser()
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config file not found: {str(path)!r}") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--config {str(path)!r} is not valid TOML: {e}") from None
    flat = {}
    for key, value in values.items():  # allow [hyperparameters]-style tables too
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    hyper_parameters = field_types()
    for key, value in flat.items():
        dest = key.replace("-", "_")
        if dest not in actions:
            raise UsageError(f"--config {str(path)!r}: unknown option {key!r}")
        try:
            if dest in hyper_parameters:
                value = check_overrides({dest: value})[dest]
            else:
                value = _toml_option(actions[dest], key, value)
        except ValueError as e:
            raise UsageError(f"--config {str(path)!r}: {e}") from None
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def _toml_option(action, key: str, value):
    """A TOML value for a non-hyper-parameter option, with the type its flag takes: true/false for
    switches (a string such as "no" would be truthy), a listed choice, a number, text."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):  # --text-encoder: one file or a list of files
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{key} must be a file name or a list of file names, got {value!r}")
        return values
    if action.type in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return action.type(value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text (a quoted string), got {value!r}")
    if action.choices and value not in action.choices:
        raise ValueError(f"{key}={value!r} is not one of {list(action.choices)}")
    return value


def _check_args(args) -> None:
    if args.data and args.prompts:
        raise UsageError("give either --data DIR or --prompts FILE, not both")
    run_setup(args).check(args)
    for name in ("preview_every", "preview_steps"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    timeout = args.dist_timeout
    if timeout is not None and not (0 < timeout < float("inf")):  # NaN fails too
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {timeout:g} "
                         "(leave it out for torch's default of 30 minutes)")


# ------------------------------------------------------------------ signals and progress

class StoppedBeforeTraining(Exception):
    """A stop signal came while starting up: nothing was written."""


class StopRequest:
    """SIGINT/SIGTERM ask the trainer to stop at the next step boundary (it then saves a resumable
    checkpoint); a second signal interrupts at once (the trainer still saves on KeyboardInterrupt).

    Installed first thing in main(): a signal while starting up (importing torch and ComfyUI, loading
    the model) is only remembered, and the run stops before training (`check`). A KeyboardInterrupt
    there could land in a library's bare `except:` and be lost, and the run would train to the end.

    Under torchrun a second signal is expected, not a user's insistence: Ctrl+C reaches every process
    and the launcher, which then sends SIGTERM to every process. There, every signal only asks for
    the stop at the step boundary, which all processes reach together."""

    def __init__(self):
        self.signum = None
        self.escalate = False  # while starting up a second signal only repeats the request
        self.training = False
        self._previous = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:
            if self.escalate:
                self.escalate = False  # once: the trainer then saves its checkpoint undisturbed
                self.signum = signum
                raise KeyboardInterrupt
            return
        self.signum = signum
        if not self.training:
            what = "stopping before training starts (nothing is written)"
        else:
            again = " (send it again to stop at once)" if self.escalate else ""
            what = f"stopping after this step and saving a resumable checkpoint{again}"
        print(f"\ncomfy-selfnpo-train: {signal.Signals(signum).name} received; {what}", file=sys.stderr, flush=True)

    def check(self) -> None:
        """While starting up: StoppedBeforeTraining if a signal came."""
        if self.signum is not None:
            raise StoppedBeforeTraining()

    def start_training(self, escalate: bool) -> None:
        """From here a stop saves a resumable checkpoint; `escalate`: a second signal stops at once."""
        self.training, self.escalate = True, escalate

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, Ctrl+C raises KeyboardInterrupt
                pass
        return self

    def restore(self):
        """The previous handlers back; after a stop, the rest of a burst of signals is ignored instead
        (the run is over and saved: the process should exit with its status, not be killed)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.signum is not None else handler)
        self._previous.clear()


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True,
                            desc="TDFT", smoothing=0.1)

    def __call__(self, progress) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{progress.loss:.4g}", lr=f"{progress.lr:.2g}", refresh=False)
            self.bar.update(progress.step - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------ the run

def _setup_logging(verbose: bool):
    """Pack messages (data warnings, resume notes) to stderr; returns a function that puts the
    logger back as it was (main() may run in-process, e.g. under the test suite)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("comfy-selfnpo-train: %(levelname)s: %(message)s"))
    pack = logging.getLogger("comfy_selfnpo")
    saved = (pack.level, pack.propagate)
    pack.addHandler(handler)
    pack.setLevel(logging.INFO if verbose else logging.WARNING)
    pack.propagate = False

    def restore():
        pack.removeHandler(handler)
        pack.setLevel(saved[0])
        pack.propagate = saved[1]
    return restore


@contextlib.contextmanager
def _quiet_imports(verbose: bool):
    """ComfyUI logs what its optional parts miss while it is imported (torchaudio, comfy_kitchen, ...):
    noise for a training run. Shown with --verbose only."""
    if verbose:
        yield
        return
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _init_comfyui(device: str, verbose: bool = False) -> None:
    with _quiet_imports(verbose):
        _import_comfyui(device)


def _import_comfyui(device: str) -> None:
    from ..comfyui_env import ensure_comfyui
    from .distributed import select_local_device

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: torch sees no CUDA GPU (use --device auto or cpu)")
    if device != "cpu":
        import torch

        select_local_device(torch.cuda.is_available())  # torchrun: this process's GPU, before ComfyUI
    ensure_comfyui(cpu={"cpu": True, "cuda": False}.get(device))  # no-op inside a running ComfyUI
    import comfy.model_management  # noqa: F401  decides CPU/GPU now

    if os.environ.get(TINY_MODELS_ENV) == "1":
        from .. import tiny_models

        tiny_models.register_tiny_model_configs()
    from ..model_folders import register_self_npo_folder

    register_self_npo_folder()


class OwnModelRun:
    """A run on the user's model and data: what `--demo` changes, in one place (DemoRun)."""
    output = "selfnpo-run"      # default run folder
    overrides: dict = {}        # hyper-parameters under the flags (the demo's budget)
    preview_steps = 20
    default_data = "prompts (the pack's default list)"  # what trains without --data or --prompts

    @property
    def preset(self) -> str:
        from .config import DEFAULT_PRESET

        return DEFAULT_PRESET

    def check(self, args) -> None:
        if not (args.checkpoint or args.diffusion_model):
            raise UsageError("no model: pass --checkpoint FILE, or --diffusion-model FILE with --text-encoder FILE")

    def preview_cfg(self) -> float:
        return 7.0

    def load(self, args):
        return _load(args)

    def data(self, args, config):
        return _data(args, config)

    def finish(self, loaded, trainer, paths, preview, result) -> None:
        pass


class DemoRun(OwnModelRun):
    """`--demo`: the built-in digits model, data-free on its prompts (unless data is given), the demo's
    preset and budget, and a CFG vs NPO-CFG grid with measured quality at the end."""
    output = "selfnpo-demo"
    preset = DEMO_PRESET
    overrides = DEMO_OVERRIDES
    preview_steps = 10
    default_data = "prompts (the digits model's)"

    def check(self, args) -> None:
        pass  # the model is built in, and so are the prompts

    def preview_cfg(self) -> float:
        from ..digits.demo import DEMO_CFG

        return DEMO_CFG

    def load(self, args):
        return _load_demo()

    def data(self, args, config):
        if args.data or args.prompts:
            return super().data(args, config)
        from ..digits.model import PROMPTS
        from .data import PromptList

        return PromptList(list(PROMPTS))

    def finish(self, loaded, trainer, paths, preview, result) -> None:
        _finish_demo(loaded, trainer, paths, preview, result)


def run_setup(args) -> OwnModelRun:
    return DemoRun() if args.demo else OwnModelRun()


def _config_from_args(args):
    from .config import field_types
    from .settings import build_config

    setup = run_setup(args)
    flags = {name: getattr(args, name) for name in field_types()}
    overrides = {**setup.overrides, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return build_config(args.preset or setup.preset, overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _load(args):
    from .model_loading import load_checkpoint, load_parts, with_shift

    if args.checkpoint and not (args.diffusion_model or args.text_encoder or args.vae):
        loaded = load_checkpoint(args.checkpoint)
    else:
        loaded = load_parts(args.diffusion_model, args.text_encoder or (), args.vae,
                            args.clip_type or "stable_diffusion", checkpoint=args.checkpoint)
    if args.shift is not None:
        loaded.model = with_shift(loaded.model, args.shift)
        loaded.description += f", shift {args.shift:g}"
    return loaded


def _load_demo():
    from ..digits.demo import DemoModelError, load_demo_model
    from .model_loading import LoadedModels, ModelLoadError

    try:
        demo = load_demo_model()
    except DemoModelError as e:
        raise ModelLoadError(str(e)) from None
    # no VAE: a digit image is its own latent (digits/model.py); previews use ComfyUI's latent preview
    return LoadedModels(demo.model, demo.clip, None, demo.description, demo=demo)


def _data(args, config):
    from .data import ImageCaptionFolder, PromptList, read_prompts_file

    if args.prompts:
        return PromptList(read_prompts_file(args.prompts))
    if not args.data:
        from .data import default_prompts

        return default_prompts()
    return ImageCaptionFolder(args.data, config.resolution, caption_extension=args.caption_extension or ".txt")


def write_demo_grid(loaded, negative_model, paths, cfg: float) -> tuple:
    """CFG | NPO-CFG (Apply Self-NPO with the trained negative model), every digit from the same
    noise, the columns labelled with the benchmark's metrics. Returns (path, {column: scores})."""
    from ..digits.demo import compare_cfg_and_npo, comparison_grid
    from ..npo.guidance import apply_self_npo
    from . import run_files

    compared = compare_cfg_and_npo(loaded.demo, apply_self_npo(loaded.model, negative_model), cfg)
    path = paths.run_dir / "demo_grid.png"
    run_files.save_png(path, comparison_grid(compared))
    return path, {column: scores for column, (_images, scores) in compared.items()}


def _say(message: str) -> None:
    print(f"comfy-selfnpo-train: {message}", file=sys.stderr, flush=True)


def _world(args):
    """This process's place in a torchrun job (or a single process)."""
    import comfy.model_management as mm

    from .distributed import world_from_environment

    world = world_from_environment(mm.get_torch_device(), timeout_s=args.dist_timeout)
    if world.size > 1:
        _say(f"{world.describe()}, device {mm.get_torch_device()}, pid {os.getpid()}")
    return world


def _session(args, config, paths, stop, world):
    from .previews import PreviewSettings
    from .session import SessionOptions, TrainingSession

    setup = run_setup(args)
    loaded, config = _load_resolved(args, config)
    data = setup.data(args, config)
    what = "images" if args.data else "prompts" if args.prompts else setup.default_data
    world.main_only(lambda: _say(
        f"{loaded.description}; {len(data)} {what}; {config.mode} mode, "
        f"{config.steps} steps, {world.describe()}; output {paths.run_dir}"))
    preview = PreviewSettings(steps=args.preview_steps or setup.preview_steps,
                              cfg=args.preview_cfg if args.preview_cfg is not None else setup.preview_cfg(),
                              size=config.resolution)
    options = SessionOptions(resume=bool(args.resume), require_resume=bool(args.resume), refuse_existing=True,
                             allow_data_change=bool(args.allow_data_change),
                             preview_every=args.preview_every or 0, preview_prompt=args.preview_prompt or "",
                             preview_seed=config.seed, preview_settings=preview, should_stop=stop,
                             sample_prompts=_sample_prompts(args, config), observers=_observers(args, world),
                             model_name=Path(args.checkpoint or args.diffusion_model or "demo").name,
                             extra_summary={"model": loaded.description, "command": sys.argv[1:],
                                            "processes": world.size})
    session = TrainingSession(loaded.model, loaded.clip, loaded.vae, data, config, paths, options, world=world)
    return session, loaded, preview


def _sample_prompts(args, config):
    from .previews import parse_sample_prompts

    return parse_sample_prompts(args.sample_prompts, config.seed) if args.sample_prompts else None


def _observers(args, world) -> list:
    """TensorBoard logging (--tensorboard), on the process that writes files."""
    if not args.tensorboard:
        return []
    from .tensorboard_log import TensorBoardLog

    try:
        return world.main_only(lambda: [TensorBoardLog(Path(args.tensorboard).expanduser())]) or []
    except ImportError as e:
        raise UsageError(str(e)) from None


def _train(args, config, paths, stop, world) -> int:
    from .distributed import launched_by_torchrun

    session, loaded, preview = _session(args, config, paths, stop, world)
    stop.check()  # loading the model takes a while
    stop.start_training(escalate=not launched_by_torchrun())
    try:
        trainer = session.prepare()
        bar = world.main_only(lambda: ProgressBar(config.steps, trainer.step, enabled=not args.no_progress))
        session.options.on_step = bar
        try:
            result = session.run()
        finally:
            if bar is not None:
                bar.close()  # before the demo grid and the final lines
    finally:
        session.close()
    world.main_only(lambda: run_setup(args).finish(loaded, trainer, paths, preview, result))
    world.main_only(lambda: _say(f"finished {result.steps} steps in {result.seconds:.1f} s; weights "
                                 f"{result.weights}; summary {paths.summary}"))
    world.main_only(lambda: print(result.weights))
    return EXIT_OK


def _finish_demo(loaded, trainer, paths, preview, result) -> None:
    from ..digits.demo import column_label
    from .run_files import save_summary

    cfg = preview.cfg
    grid, scores = write_demo_grid(loaded, trainer.negative_model(), paths, cfg)
    result.summary["paths"]["demo_grid"] = str(grid)
    result.summary["demo"] = {"cfg": cfg, "scores": scores}
    save_summary(paths.summary, result.summary)
    _say(f"demo grid (CFG vs NPO-CFG at cfg {cfg:g}, same seeds): {grid}")
    _say(" | ".join(column_label(column, s) for column, s in scores.items())
         + " (FD: distance to real digits in a classifier's features, lower is better)")
    for line in DEMO_READING:
        _say(line)


# What a user sees after the demo, and why (docs/what_to_expect.md, "Reading the demo and a run").
DEMO_READING = (
    "what to look for: the two halves of the grid start from the same noise, so most digits look alike "
    "and NPO-CFG changes a few strokes; the measured FD and accuracy above say which side is better.",
    "the loss curve (loss.png) is flat and noisy by nature: every step draws new noise levels, and "
    "the target is the model's own corrupted prediction, so the loss does not fall towards zero; judge "
    "a run by its previews, not its loss.",
)


def _run_paths(args, config):
    from .run_files import RunPaths
    from .session import OutputError, check_run_name

    output = Path(args.output or run_setup(args).output).expanduser().resolve()
    try:
        name = check_run_name(args.name or "self_npo")
    except OutputError as e:
        raise UsageError(str(e)) from None
    return RunPaths(run_dir=output, weights=output / f"{name}.safetensors")


# What gloo, NCCL and torch's store say (in any case) when a peer is gone or stopped answering.
LOST_PROCESS_SIGNS = ("connection closed by peer", "connection reset by peer", "connection refused", "broken pipe",
                      "timed out", "timeout", "socket closed", "nccl communicator was aborted")


def _is_lost_process(e: BaseException) -> bool:
    """A collective failed because another process of the job is gone or hangs (gloo/NCCL/store errors:
    torch's DistError kinds, or a RuntimeError such as gloo's "Timed out waiting 20000ms for recv").
    Only under torchrun: a single process has no other process to lose."""
    import torch.distributed as dist

    from .distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return False
    kinds = tuple(k for k in (getattr(dist, name, None) for name in
                              ("DistError", "DistBackendError", "DistNetworkError", "DistStoreError"))
                  if isinstance(k, type))
    seen = set()
    while e is not None and id(e) not in seen:  # the collective's error may be the cause of the one raised
        seen.add(id(e))
        text = str(e).lower()
        if isinstance(e, kinds) or (isinstance(e, (RuntimeError, ConnectionError, TimeoutError))
                                    and any(sign in text for sign in LOST_PROCESS_SIGNS)):
            return True
        e = e.__cause__ or e.__context__
    return False


_MISMATCH_HINT = {  # by ResumeMismatch.data_only
    False: "To train with these settings from scratch, choose another --output or --name",
    True: "If the new data is intended, add --allow-data-change; to train on it from scratch, choose another "
          "--output or --name",
}


def _exit_code(e: BaseException, stop) -> int:
    """Print what happened (one line, no traceback) and return the documented exit status; anything
    unexpected is re-raised (main prints the traceback, exit 1)."""
    import torch

    from .errors import (NonFiniteLoss, OutOfMemory, ProcessesDisagree, ResumeMismatch, TrainingCancelled,
                         TrainingError, out_of_memory)
    from .session import OutputError, RunExists, describe_os_error

    if isinstance(e, TrainingCancelled):
        _say(f"{e}. Continue with the same command plus --resume.")
        return EXIT_SIGNAL.get(stop.signum, 130)
    if isinstance(e, StoppedBeforeTraining):
        _say(f"stopped by {signal.Signals(stop.signum).name} before training started; nothing was written.")
        return EXIT_SIGNAL.get(stop.signum, 130)
    if isinstance(e, KeyboardInterrupt):
        _say("interrupted; the trainer saved a resumable checkpoint if it had started (continue with --resume).")
        return EXIT_SIGNAL.get(stop.signum, 130)
    if isinstance(e, (OutOfMemory, torch.OutOfMemoryError)):  # a bare torch error: while loading
        _say(str(e if isinstance(e, OutOfMemory) else out_of_memory(e, 0)))
        return EXIT_OOM
    if isinstance(e, ResumeMismatch):
        _say(f"error: {e}. {_MISMATCH_HINT[e.data_only]}")
        return EXIT_MISMATCH
    for kind, code in ((NonFiniteLoss, EXIT_NONFINITE), (RunExists, EXIT_EXISTS), (OutputError, EXIT_WRITE),
                       (ProcessesDisagree, EXIT_USAGE), (TrainingError, EXIT_INPUT)):
        if isinstance(e, kind):  # TrainingError: ModelLoadError, UnsupportedModel, DataError, UnusableCheckpoint, ...
            _say(f"error: {e}")
            return code
    if _is_lost_process(e):
        _say(f"error: lost contact with another process of this torchrun job ({str(e).splitlines()[0]}); "
             "every process stops. The last checkpoint is kept: fix the failed process or machine and rerun "
             "with --resume.")
        return EXIT_LOST
    if isinstance(e, OSError):  # e.g. a log file could not be written
        _say(f"error: {describe_os_error(e, 'the run files')}")
        return EXIT_WRITE
    raise e


def _load_resolved(args, config):
    """The model a run of these arguments trains, and `config` with its family's recipe where the
    config leaves it open (what a run, --print-config and --plan all use)."""
    from .recipes import resolve_for_model

    loaded = run_setup(args).load(args)
    return loaded, resolve_for_model(config, loaded.model)


def _print_config(args, config) -> int:
    """--print-config: the configuration a run of these arguments would use, as a --config TOML file."""
    from .families import family_of
    from .recipes import describe_recipe
    from .settings import config_toml

    loaded, config = _load_resolved(args, config)
    skip = {"config", "print_config", "preset", *config.to_dict()}
    options = {name: value for name, value in vars(args).items() if value is not None and name not in skip}
    print(f"# {describe_recipe(config, family_of(loaded.model.model))}")
    print(config_toml(options, config), end="")
    return EXIT_OK


def _plan(args, config) -> int:
    """--plan: load the model as a run would, print the planner's table (planner.py), train nothing."""
    from .planner import format_plan, plan_for_model

    loaded, config = _load_resolved(args, config)  # the run's own recipe: resolution, w, ...
    print(format_plan(plan_for_model(loaded.model, loaded.clip, loaded.vae, config, _say)), flush=True)
    return EXIT_OK


# what the run flags do instead of training; each loads the model as a run would and exits
INSTEAD_OF_TRAINING = {"print_config": _print_config, "plan": _plan}


def run(args, stop: StopRequest) -> int:
    config = _config_from_args(args)
    instead = next((do for flag, do in INSTEAD_OF_TRAINING.items() if getattr(args, flag)), None)
    paths = None if instead else _run_paths(args, config)
    world = None
    try:
        stop.check()  # importing torch and ComfyUI takes a while
        if instead:
            return instead(args, config)  # bad model files get their documented exit status below
        world = _world(args)
        return _train(args, config, paths, stop, world)
    except BaseException as e:  # noqa: B902  every outcome gets its documented exit status
        return _exit_code(e, stop)
    finally:
        if world is not None:
            world.close()


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    stop = StopRequest().install()  # first: a signal while starting up is kept (see StopRequest)
    restore_logging = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        apply_toml(args, parser)
        _check_args(args)
        restore_logging = _setup_logging(bool(args.verbose))
        _init_comfyui(args.device or "auto", bool(args.verbose))
        code = run(args, stop)
    except SystemExit as e:  # argparse: --help (0) or bad flags (2)
        return int(e.code or 0)
    except UsageError as e:
        print(f"comfy-selfnpo-train: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        import traceback

        traceback.print_exc()
        print("comfy-selfnpo-train: unexpected error (a bug; please report it with the traceback above)",
              file=sys.stderr)
        return EXIT_ERROR
    finally:
        stop.restore()
        if restore_logging is not None:
            restore_logging()
    log.info("done in %.1f s", time.perf_counter() - started)
    return code


if __name__ == "__main__":
    sys.exit(main())
