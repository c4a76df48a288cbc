import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread unless OMP_NUM_THREADS says otherwise: the suite is also run at 2 threads (README, "Testing on other
# kernels"), which changes how CPU reductions are split.
THREADS = int(os.environ["OMP_NUM_THREADS"])
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _threads_restored():
    """Code under test may set torch's thread count (the sandbox trainer does); every test starts at THREADS."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared is absent (a user's clone has no shared/)")
    return SHARED


# Sampler defaults of the tiny models: few steps, 32 px. FLUX: guidance 4 = true CFG with the empty negative prompt,
# so guards that steer the negative branch act (FLUX's own default is 1: one branch, embedded guidance 3.5).
TINY_DEFAULTS = {"steps": 3, "guidance": 5.0, "height": 32, "width": 32}
TINY = {"tiny-sd": TINY_DEFAULTS, "tiny-sdxl": TINY_DEFAULTS, "tiny-sd3": TINY_DEFAULTS,
        "tiny-flux": {**TINY_DEFAULTS, "guidance": 4.0, "embedded_guidance": 3.5},
        "tiny-flux-schnell": {**TINY_DEFAULTS, "guidance": 4.0}}


def tiny_model(arch: str):
    """A fresh tiny model of ``arch`` (random weights from seed 0) with the test defaults."""
    from safediff.models import from_pipeline
    from safediff.random_models import build_pipeline

    return from_pipeline(build_pipeline(arch), spec=arch, defaults=dict(TINY[arch]))


@pytest.fixture
def tiny_sd():
    return tiny_model("tiny-sd")


@pytest.fixture
def tiny_sdxl():
    return tiny_model("tiny-sdxl")


@pytest.fixture
def tiny_sd3():
    return tiny_model("tiny-sd3")


@pytest.fixture
def tiny_flux():
    return tiny_model("tiny-flux")


@pytest.fixture
def tiny_flux_schnell():
    return tiny_model("tiny-flux-schnell")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny SD-1.x pipeline saved as a local diffusers folder (what `--model DIR` reads)."""
    from safediff.random_models import build_pipeline

    d = tmp_path_factory.mktemp("tiny") / "pipe"
    build_pipeline("tiny-sd").save_pretrained(d)
    return d
