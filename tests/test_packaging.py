"""What the pack declares matches what it does: runtime imports against the declared dependencies,
requirements.txt against pyproject.toml, the TOML config path on the lowest supported Python."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from conftest import COMFYUI_ROOT, PACK_ROOT

PYPROJECT = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
# Folders that never run inside ComfyUI or the CLI: nothing there counts as a runtime import.
NOT_RUNTIME = {"tests", "bench", "scripts"}

# The one list of what a runtime module of the pack may import besides the standard library, the
# pack itself, ComfyUI's own modules and the runtime dependencies of pyproject.toml:
# * packages ComfyUI itself requires (import name -> distribution; checked against the pinned
#   ComfyUI's requirements.txt below), so every ComfyUI install has them;
FROM_COMFYUI = {"numpy": "numpy", "PIL": "Pillow", "av": "av",  # av: video clips as training data
                "aiohttp": "aiohttp"}  # aiohttp: the template-thumbnail route, inside the server only
# * optional packages, imported only inside `try/except` with a fallback (checked below).
OPTIONAL = {
    "bitsandbytes": "the `train` extra: 8-bit AdamW; training falls back to AdamW without it",
    "torchvision": "probed by comfyui_env, which installs a minimal stand-in when it is missing",
}


def _distribution_name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[]", requirement.strip(), maxsplit=1)[0].lower().replace("-", "_")


def runtime_dependencies() -> dict[str, str]:
    """Import name -> requirement string, from [project].dependencies (import names equal the
    distribution names for every one of them)."""
    return {_distribution_name(r): r for r in PYPROJECT["project"]["dependencies"]}


def runtime_modules() -> list[Path]:
    out = []
    for dirpath, dirs, files in os.walk(PACK_ROOT):
        rel = Path(dirpath).relative_to(PACK_ROOT)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules", "build")
                         and not d.endswith(".egg-info") and not (rel == Path(".") and d in NOT_RUNTIME))
        out += [Path(dirpath) / f for f in sorted(files) if f.endswith(".py")]
    return out


def _imports(node: ast.AST, guarded: bool = False):
    """(top-level module name, node, guarded) for every absolute import under `node`; guarded = inside
    the body of a `try` that catches ImportError (or a base class of it)."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name.split(".")[0], node, guarded
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        yield node.module.split(".")[0], node, guarded
    elif isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
        for stmt in node.body:
            yield from _imports(stmt, True)
        for stmt in [*node.handlers, *node.orelse, *node.finalbody]:
            yield from _imports(stmt, guarded)
    else:
        for child in ast.iter_child_nodes(node):
            yield from _imports(child, guarded)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return handler.type is None or any(isinstance(n, ast.Name) and n.id in
                                       ("ImportError", "ModuleNotFoundError", "Exception", "BaseException")
                                       for n in names)


def comfyui_module_names() -> set[str]:
    """ComfyUI's own top-level modules (what `import nodes`, `import comfy...` resolve to)."""
    return {p.stem for p in COMFYUI_ROOT.glob("*.py")} | {p.name for p in COMFYUI_ROOT.iterdir()
                                                          if (p / "__init__.py").is_file() or p.name.startswith("comfy")}


def pack_module_names() -> set[str]:
    """Modules of the pack imported by a bare name (workflows/build.py puts its folder and the pack
    root on sys.path): every module file and package folder of the pack."""
    return {"comfy_selfnpo"} | {p.stem for p in runtime_modules()} | {p.parent.name for p in runtime_modules()}


def test_runtime_modules_import_only_declared_packages():
    declared = set(runtime_dependencies())
    local = pack_module_names() | comfyui_module_names()
    problems, seen = [], set()
    for path in runtime_modules():
        for name, node, guarded in _imports(ast.parse(path.read_text(), str(path))):
            if name in sys.stdlib_module_names or name in local:
                continue
            seen.add(name)
            where = f"{path.relative_to(PACK_ROOT)}:{node.lineno}"
            if name in OPTIONAL and not guarded:
                problems.append(f"{where}: optional package {name!r} imported outside try/except ImportError")
            elif name not in declared | set(FROM_COMFYUI) | set(OPTIONAL):
                problems.append(f"{where}: imports {name!r}, which is neither a runtime dependency in "
                                "pyproject.toml nor a package ComfyUI requires")
    assert not problems, "\n".join(problems)
    # the check sees the imports it is about (a walker that found nothing would pass vacuously)
    assert {"torch", "safetensors", "tqdm", "tomli", "numpy", "PIL", "bitsandbytes"} <= seen, seen


def test_the_allowed_comfyui_packages_are_ones_comfyui_requires():
    text = (COMFYUI_ROOT / "requirements.txt").read_text()
    required = {_distribution_name(line) for line in text.splitlines() if line.strip() and not line.startswith("#")}
    for import_name, distribution in FROM_COMFYUI.items():
        assert _distribution_name(distribution) in required, (import_name, distribution)
    assert "diffusers" not in runtime_dependencies() and "einops" not in runtime_dependencies()
    assert PYPROJECT["project"]["optional-dependencies"]["bench"][0].startswith("diffusers")


def test_requirements_txt_is_the_runtime_dependencies_without_torch():
    """requirements.txt is what ComfyUI-Manager installs; torch comes with ComfyUI."""
    lines = [line for line in (PACK_ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def normal(requirement: str) -> str:
        return re.sub(r"\s+", "", requirement).replace('"', "'")

    expected = {normal(r) for name, r in runtime_dependencies().items() if name != "torch"}
    assert {normal(line) for line in lines} == expected


@pytest.fixture
def without_bench_packages(tmp_path) -> dict:
    """An environment whose Python cannot import the benchmark-only packages (diffusers): the
    runtime requirements alone, as ComfyUI-Manager installs them (ComfyUI itself needs einops)."""
    blocker = tmp_path / "block_bench_packages"
    blocker.mkdir()
    # a None entry in sys.modules: `import diffusers` fails and find_spec() probes see no diffusers
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['diffusers'] = None\n")
    from cli_setup import cli_env

    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    return env


def test_nodes_and_every_runtime_module_load_without_bench_packages(without_bench_packages):
    modules = sorted("comfy_selfnpo." + ".".join(p.relative_to(PACK_ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for p in runtime_modules() if p.parent.name != "workflows" and p != PACK_ROOT / "__init__.py")
    code = textwrap.dedent(f"""
        import asyncio, importlib, sys
        assert sys.modules["diffusers"] is None
        from comfy_selfnpo.comfyui_env import ensure_comfyui
        ensure_comfyui(cpu=True)
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        assert asyncio.run(nodes.load_custom_node({str(PACK_ROOT)!r}))
        for name in {modules!r}:
            importlib.import_module(name)
        print(sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith("SelfNPO")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=without_bench_packages,
                         cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == str(
        ["SelfNPOApply", "SelfNPOCFGGuider", "SelfNPONegativeModelLoader", "SelfNPOTrainTDFT"])
    assert len(modules) > 20


def test_the_demo_runs_without_bench_packages(without_bench_packages, tmp_path):
    from cli_setup import cli_executable

    out = tmp_path / "demo"
    run = subprocess.run([cli_executable(), "--demo", "--steps", "2", "--batch-size", "2", "--trajectory-buffer", "2", "--no-progress",
                          "--output", str(out)], env=without_bench_packages, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "demo_grid.png").stat().st_size > 0 and (out / "self_npo.safetensors").stat().st_size > 0


# ------------------------------------------------------------------ the lowest supported Python

def lowest_python() -> tuple[str, str] | None:
    """(version, interpreter) of the lowest Python that requires-python admits, if this machine has it:
    SELFNPO_LOWEST_PYTHON, `python3.X` on PATH, or a pyenv install."""
    version = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    candidates = [os.environ.get("SELFNPO_LOWEST_PYTHON"), f"python{version}"]
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates += [str(p / "bin" / f"python{version}") for p in sorted(pyenv_root.glob(f"versions/{version}.*"))]
    for candidate in filter(None, candidates):
        probe = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True) if _runnable(candidate) else None
        if probe is not None and probe.returncode == 0 and probe.stdout.strip() == version:
            return version, candidate
    return None


def _runnable(candidate: str) -> bool:
    import shutil

    return shutil.which(candidate) is not None or Path(candidate).is_file()


@pytest.fixture(scope="module")
def lowest_python_venv(tmp_path_factory):
    """A venv of the lowest supported Python with the pack's dependencies that the TOML path needs
    (tomli there; torch is not needed to read a config)."""
    found = lowest_python()
    if found is None:
        pytest.skip("no interpreter of the lowest supported Python here: set SELFNPO_LOWEST_PYTHON")
    venv = tmp_path_factory.mktemp("lowest-python") / "venv"
    subprocess.run([found[1], "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    tomli = runtime_dependencies()["tomli"].split(";")[0]
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", tomli], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    return found[0], python


_LOAD_PACK = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("comfy_selfnpo", {str(PACK_ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(PACK_ROOT)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["comfy_selfnpo"] = mod; spec.loader.exec_module(mod)
from comfy_selfnpo.training import cli
"""


def test_config_toml_is_read_on_the_lowest_supported_python(lowest_python_venv, tmp_path):
    version, python = lowest_python_venv
    config = tmp_path / "run.toml"
    config.write_text('checkpoint = "models/sd15.safetensors"\npreset = "lora-12gb"\n'
                      '[hyperparameters]\nsteps = 1500\nlearning_rate = 5e-5\nresolution = 512\n')
    code = _LOAD_PACK + textwrap.dedent(f"""
        parser = cli.build_parser()
        args = parser.parse_args(["--config", {str(config)!r}, "--steps", "7"])
        cli.apply_toml(args, parser)
        print(json.dumps(dict(python="%d.%d" % sys.version_info[:2], tomli="tomli" in sys.modules,
                              torch="torch" in sys.modules, checkpoint=args.checkpoint, preset=args.preset,
                              steps=args.steps, learning_rate=args.learning_rate, resolution=args.resolution)))
    """)
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got == dict(python=version, tomli=version < "3.11", torch=False, checkpoint="models/sd15.safetensors",
                       preset="lora-12gb", steps=7, learning_rate=5e-5, resolution=512)


def test_a_broken_config_toml_is_a_usage_error_on_the_lowest_supported_python(lowest_python_venv, tmp_path):
    _, python = lowest_python_venv
    broken = tmp_path / "broken.toml"
    broken.write_text("steps = = 3\n")
    code = _LOAD_PACK + f"sys.exit(cli.main(['--config', {str(broken)!r}]))"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert f"--config '{broken}' is not valid TOML" in out.stderr


def test_every_runtime_module_compiles_on_the_lowest_supported_python(lowest_python_venv):
    _, python = lowest_python_venv
    files = [str(p) for p in runtime_modules()]
    code = "import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\nprint(len(sys.argv) - 1)"
    out = subprocess.run([str(python), "-c", code, *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == len(files) > 20


# ------------------------------------------------------------------ the Comfy registry

def comfy_cli() -> Path:
    """The registry's CLI, installed by scripts/setup_env.sh in a venv of its own."""
    path = Path(os.environ.get("SELFNPO_COMFY_CLI") or Path(sys.prefix) / "registry-tools" / "bin" / "comfy")
    assert path.is_file(), f"comfy-cli not found at {path}: run `bash scripts/setup_env.sh` (or set SELFNPO_COMFY_CLI)"
    return path


def run_comfy_cli(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    """`comfy ...` offline, without prompts or telemetry, with its config in a throw-away HOME."""
    (home / ".config").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home), NO_COLOR="1", COLUMNS="200")
    return subprocess.run([str(comfy_cli()), "--skip-prompt", "--no-enable-telemetry", *args], cwd=str(cwd),
                          env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture(scope="module")
def release_checkout(tmp_path_factory) -> Path:
    """The repository as it would be committed (tracked and new unignored files, their current
    content) in a fresh git repository: what the registry's publish step sees."""
    listed = subprocess.run(["git", "-C", str(PACK_ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split("\0")
    dest = tmp_path_factory.mktemp("release") / "comfy-selfnpo"
    for rel in filter(None, listed):
        source = PACK_ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(source.read_bytes())
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "add", "-A"], check=True)
    return dest


@pytest.fixture(scope="module")
def registry_archive(release_checkout, tmp_path_factory) -> list[str]:
    """File names in the archive `comfy node pack` builds (git-tracked files minus .comfyignore)."""
    import zipfile

    out = run_comfy_cli("node", "pack", cwd=release_checkout, home=tmp_path_factory.mktemp("home"))
    assert out.returncode == 0, out.stdout + out.stderr
    with zipfile.ZipFile(release_checkout / "node.zip") as archive:
        return sorted(archive.namelist())


def test_comfy_node_validate_passes_without_warnings(release_checkout, tmp_path):
    out = run_comfy_cli("node", "validate", cwd=release_checkout, home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    said = out.stdout + out.stderr
    assert "All validation checks passed" in said, said
    assert "Warning" not in said and "Security warnings" not in said, said


def test_registry_archive_ships_the_pack_and_leaves_out_tests_bench_ci_and_scripts(registry_archive):
    names = registry_archive
    for left_out in ("tests/", "bench/", "scripts/", ".ci/", ".github/"):
        assert not [n for n in names if n.startswith(left_out)], left_out
    assert not [n for n in names if n.startswith("workflows/") and n.endswith(".py")], "the generator stays out"
    for needed in ("__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt", "model_folders.py",
                   "comfyui_env.py", "tiny_models/__init__.py", "nodes/__init__.py", "npo/weights/__init__.py", "training/cli.py",
                   "training/default_prompts.txt",
                   "docs/algorithm.md", "docs/images/icon.png"):
        assert needed in names, needed
    templates = sorted(n for n in names if n.startswith("example_workflows/") and n.endswith(".json"))
    committed = sorted(f"example_workflows/{p.name}" for p in (PACK_ROOT / "example_workflows").glob("*.json"))
    assert templates == committed and len(templates) >= 6  # SD1.5, SDXL, Wan video, Qwen-Image, training
    for template in templates:  # every template ships with its thumbnail and its API twin
        assert template.removesuffix(".json") + ".jpg" in names, template
    assert len([n for n in names if n.startswith("workflows/api/") and n.endswith(".json")]) == len(templates)


def test_registry_metadata_is_complete():
    comfy = PYPROJECT["tool"]["comfy"]
    project = PYPROJECT["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and project["description"]
    # the icon URL names a committed file: the registry shows it from the main branch
    icon = comfy["Icon"]
    prefix = project["urls"]["Repository"].replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert icon.startswith(prefix), icon
    from PIL import Image

    with Image.open(PACK_ROOT / icon.removeprefix(prefix)) as image:
        assert image.format == "PNG" and image.size[0] == image.size[1] <= 512
    assert (PACK_ROOT / icon.removeprefix(prefix)).stat().st_size < 64 * 1024
    # the lowest core in the range is the one the suite runs
    version = (COMFYUI_ROOT / "comfyui_version.py").read_text()
    pinned = re.search(r'__version__ = "([\d.]+)"', version).group(1)
    assert comfy["requires-comfyui"].split(",")[0] == f">={pinned}"
    assert project["license"] == "GPL-3.0-or-later" and project["license-files"] == ["LICENSE"]
    license_text = (PACK_ROOT / "LICENSE").read_text()
    assert license_text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE") and "Version 3, 29 June 2007" in license_text
    workflow = (PACK_ROOT / ".github" / "workflows" / "publish.yml").read_text()
    assert "Comfy-Org/publish-node-action@v1" in workflow and "secrets.REGISTRY_ACCESS_TOKEN" in workflow
