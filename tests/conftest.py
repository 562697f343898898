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
    then its report (tests/conftest_workflow.py). Read it; to run Snakemake on it again, work
    on ``conftest_workflow.copy_run(tiny_run, folder)``."""
    from conftest_workflow import run_tiny_dag

    return run_tiny_dag(tmp_path_factory.mktemp("tiny_run"))


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
def _slurm_dag_started_early(request, tmp_path_factory, _compile_caches_for_subprocesses):
    """tests/test_slurm.py's DAG, submitted as the session starts when that test is collected
    and a SLURM answers (tests/conftest_slurm.py): the other tests run while its jobs wait for
    SLURM's status checks. Stopped, if still running, when the session ends."""
    from conftest_slurm import start_dag_early

    dag = start_dag_early(request.session.items, lambda: tmp_path_factory.mktemp("slurm"))
    yield
    if dag is not None:
        dag.stop()
