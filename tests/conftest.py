"""Session setup shared by every test module.

Triton kernels run on CPU tensors only under its interpreter, and the interpreter is chosen
when a kernel is *defined*: so ``TRITON_INTERPRET=1`` is set here, before any test module
imports ``sigmoid_sc.attention.triton_sigmoid``, and only where no CUDA device exists.
"""

import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means no CUDA either
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402

#: fixtures of the tests that run last: a whole DAG (the shared run, the SLURM DAG) or SLURM itself
LATE_FIXTURES = {"tiny_run", "slurm_run", "slurm_cluster"}


def pytest_collection_modifyitems(session, config, items):
    """The tests that need a whole DAG or SLURM run last (each group in its collected order):
    the others run first, while the DAGs that start with the session run in the background
    (``_shared_runs_started_early``)."""
    items.sort(key=lambda item: bool(LATE_FIXTURES & set(getattr(item, "fixturenames", ()))))


@pytest.fixture(scope="session", autouse=True)
def _compile_caches_for_subprocesses(tmp_path_factory):
    """One numba and one JAX compilation cache for every process the tests start: evaluate's
    UMAP and scib-metrics code then compile once per session (per input shape, for JAX), not
    once per Snakemake working folder (evaluate uses ``./.cache/numba`` and the evaluate rule
    ``results/.cache/jax`` unless these variables are set). Folders the user set win."""
    root = tmp_path_factory.getbasetemp() / "compile-cache"
    names = ("NUMBA_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR")
    added = [name for name in names if name not in os.environ]
    for name in added:
        os.environ[name] = str(root / name.split("_")[0].lower())
    yield
    for name in added:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The whole DAG of tests/configs/tiny.yaml, run once per session by Snakemake on 2 cores,
    then its report (tests/conftest_workflow.py; started with the session). Read it; to run
    Snakemake on it again, work on ``conftest_workflow.copy_run(tiny_run, folder)``."""
    from conftest_workflow import start_tiny_dag, started_tiny_dag

    dag = started_tiny_dag() or start_tiny_dag(tmp_path_factory.mktemp("tiny_run"))
    return dag.wait()


@pytest.fixture
def one_thread():
    """One torch thread for tiny models: fastest, and spares a loaded 2-core CI box
    oversubscription. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokens_path(tmp_path_factory):
    """A small structured tokens.npz (tests/conftest_tokens.py), one per test module."""
    from conftest_tokens import make_tokens

    return make_tokens(tmp_path_factory.mktemp("tokens") / "tokens.npz")


@pytest.fixture(scope="session", autouse=True)
def _shared_runs_started_early(request, tmp_path_factory, _compile_caches_for_subprocesses):
    """The session's two whole DAGs, started as the session starts when a collected test needs
    them: tests/test_slurm.py's, when a SLURM answers (tests/conftest_slurm.py; its jobs
    mostly wait for SLURM's status checks), and the shared tiny run (tests/conftest_workflow.py).
    The other tests run meanwhile (the ones that need the DAGs run last). Stopped, if still
    running, when the session ends."""
    from conftest_slurm import start_dag_early
    from conftest_workflow import start_tiny_dag_early

    items = request.session.items
    dags = [
        start_dag_early(items, lambda: tmp_path_factory.mktemp("slurm")),
        start_tiny_dag_early(items, lambda: tmp_path_factory.mktemp("tiny_run")),
    ]
    yield
    for dag in dags:
        if dag is not None:
            dag.stop()
