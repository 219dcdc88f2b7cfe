import atexit
import collections
import contextlib
import html
import os
import re
import shutil
import socket
import sys
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from hydra import compose, initialize_config_dir

# Set before JAX is imported (the test modules import it), for this process and, by inheritance, for
# the pytest-xdist workers and every stage the tests start. One JAX compilation cache: the tests
# compile the same small programs again and again, and a cached one loads in milliseconds. No LLVM
# optimisations: the tests' models are tiny and run a few steps, so compiling costs more than running
# (a cold training run of the tests' model takes 12 s instead of 18, test_setdiff.py 94 s instead of
# 118); the toy models' thousand steps run slower (test_toy_learning.py 107 s instead of 83).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "jet-setdiff-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
XLA_FLAGS = os.environ["XLA_FLAGS"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# Module-scoped fixtures run stages before any test's own store exists (isolated_tracking): they log
# to a store of this test process, never to the project's mlflow.db or a team's server.
_FIXTURE_STORE_DIR = tempfile.mkdtemp(prefix="jet-setdiff-tests-")
atexit.register(shutil.rmtree, _FIXTURE_STORE_DIR, ignore_errors=True)  # each test process removes its own
FIXTURE_TRACKING_URI = f"sqlite:///{_FIXTURE_STORE_DIR}/mlflow.db"
os.environ["MLFLOW_TRACKING_URI"] = FIXTURE_TRACKING_URI


def pytest_collection_modifyitems(items):
    """Modules run in the order of how many slow tests they hold, most first, and among equals of how
    many tests they hold: pytest-xdist hands out whole modules in this order (``--dist loadfile
    --no-loadscope-reorder``), and a long one handed out last would leave the other workers idle
    while it runs. The second key puts the library's tests (test_setdiff.py: fifty tests of a few
    seconds each, three minutes in all) before the modules of a few quick ones."""
    slow_tests = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    tests = collections.Counter(item.path for item in items)
    items.sort(key=lambda item: (-slow_tests[item.path], -tests[item.path]))


@pytest.fixture(scope="session")
def empty_tracking_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store whose tables exist: making them takes seconds, copying the file not."""
    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path_factory, monkeypatch, empty_tracking_store):
    """Every test logs to its own sqlite store (a copy of an empty one), never to the project's mlflow.db."""
    store = tmp_path_factory.mktemp("tracking") / "mlflow.db"  # beside the test's tmp_path, not in it
    shutil.copyfile(empty_tracking_store, store)
    uri = f"sqlite:///{store}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PIPELINE_EXECUTION_ID", "unset")  # recorded, so teardown removes what a stage exports
    monkeypatch.delenv("PIPELINE_EXECUTION_ID")
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def run_stage(module: str, *overrides: str, cwd=PROJECT_ROOT, env=None) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline.<module> overrides...`` as a user would; capture its output. Run from
    the project root with no ``results_dir`` among the overrides, the stage writes its log and Hydra's
    record of its config to a fresh temporary folder, not into the project's results/, and removed after."""
    with contextlib.ExitStack() as stack:
        if Path(cwd) == PROJECT_ROOT and not any(override.startswith("results_dir=") for override in overrides):
            overrides = (*overrides, f"results_dir={stack.enter_context(tempfile.TemporaryDirectory(prefix='jet-setdiff-tests-results-'))}")
        return subprocess.run(
            [sys.executable, "-m", f"pipeline.{module}", *overrides],
            cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=600,
        )


# A model and run small enough that a stage finishes in seconds on a CPU.
TINY = [
    "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
    "train.steps=30", "train.batch_size=8", "train.warmup_steps=5", "train.log_every=10", "toy.steps=20",
    "sample.steps=4", "sample.n_jets=20",
    "evaluate.n_jets=300", "evaluate.fpd_min_jets=40", "evaluate.fpd_max_jets=80", "evaluate.fpd_points=3",
    "evaluate.fpd_batches=2", "evaluate.kpd_batches=3", "evaluate.kpd_jets=40", "evaluate.cov_mmd_jets=10",
    "evaluate.cov_mmd_batches=2",
]


def compose_config(*overrides: str):
    """The config a stage composes from these overrides, for calling a stage's code in-process."""
    import pipeline.config  # noqa: F401  (registers the schema the config's defaults list names)

    with initialize_config_dir(str(PROJECT_ROOT / "pipeline" / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# The workflow tests' dataset. The generator's old pT-hat floor (0.9 x jet_pt_min) needs 7-10x fewer
# events per jet than the default; what it sculpts in the jet-pT spectrum does not matter to what
# these tests check.
TINY_DATA = ["data.generator.jets_per_shard=20", "data.generator.batch_events=40", "data.generator.pt_hat_min_fraction=0.9"]


def copy_workflow(folder, *overrides, raw_shards: Path | None = None) -> dict:
    """The workflow in ``folder`` with one experiment, demo with a tiny model and dataset; returns its
    config. With ``raw_shards`` (:func:`tiny_pythia_shards`), the dataset's raw files are already
    there, so the workflow starts at preprocessing (the tests whose point is not generation)."""
    for name in ("Snakefile", "workflow", "environment.yml"):
        source = PROJECT_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    if raw_shards is not None:
        shutil.copytree(raw_shards, folder / "data" / "raw" / "pythia")
    config = {"experiments": {"demo": [*TINY, *TINY_DATA, *overrides]}}
    (folder / "workflow" / "config.yaml").write_text(yaml.safe_dump(config))
    return config


@pytest.fixture(scope="session")
def tiny_pythia_shards(tmp_path_factory) -> Path:
    """Shard 0 of every class of the ``pythia`` dataset, as the workflow of :func:`copy_workflow`
    generates it (same settings, same seed), made once for the whole run: the pytest-xdist workers
    share one folder, and the first to take its lock writes the files."""
    import fcntl

    from pipeline.generate import generate_shard, shard_path, write_root

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    run_folder = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    folder = run_folder / "tiny-pythia-shards"
    with open(run_folder / "tiny-pythia-shards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not folder.is_dir():
            config = compose_config("data=pythia", *TINY_DATA)
            written = Path(tempfile.mkdtemp(dir=run_folder))
            for class_name in config.data.class_names:
                jets = generate_shard(class_name, 0, config.seed, config.data.generator, progress=False)["jets"]
                write_root(shard_path(written, class_name, 0), jets, class_name)
            written.rename(folder)
    return folder


def snakemake(*args, cwd=PROJECT_ROOT) -> subprocess.CompletedProcess:
    """Run ``snakemake args...`` in ``cwd`` as a user would; capture its output."""
    return subprocess.run(["snakemake", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ)


def assert_refused(result, message):
    """The workflow stopped before any job with one sentence holding ``message``, and exit status 2."""
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2 and len(output.splitlines()) == 1, output
    assert output.startswith("workflow config (") and message in output, output


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local server or jax.distributed's coordinator)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(backend_store_uri: str, cwd=None):
    """``mlflow ui`` on ``backend_store_uri`` and a free port, as the README starts it; yields its URL
    once it answers, stops it afterwards."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # as the README's command sets it
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", backend_store_uri, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # plain requests: MlflowClient retries a refused connection with growing waits
            try:
                urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt-get where it is missing (root only); skips, saying why,
    where neither works."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and installing it needs root and apt-get")
    install = subprocess.run(["bash", str(PROJECT_ROOT / "tests" / "install_chromium.sh")], capture_output=True, text=True, timeout=900)
    if install.returncode != 0 or not shutil.which("chromium"):
        pytest.skip(f"could not install chromium with apt-get: {install.stderr.strip()[-500:]}")
    return shutil.which("chromium")


def rendered_dom(chromium: str, url: str) -> str:
    """The HTML of ``url`` once its scripts have run and its requests answered (headless Chromium)."""
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1920,2400",
         "--virtual-time-budget=30000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    ).stdout


def page_text(chromium: str, url: str) -> str:
    """The text a person sees at ``url`` (``rendered_dom``, tags and scripts removed, whitespace collapsed)."""
    dom = rendered_dom(chromium, url)
    visible = re.sub(r"<(script|style|svg)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", visible)))
