import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def find_shared_data():
    """The shared real-data folder (`shared/data` beside or above the repo), or None."""
    d = ROOT
    for _ in range(4):
        cand = os.path.join(d, "shared", "data")
        if os.path.isdir(cand):
            return cand
        d = os.path.dirname(d)
    return None


@pytest.fixture(scope="session")
def shared_data():
    path = find_shared_data()
    if path is None:
        pytest.skip("shared/data not found")
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build (once per session) tiny random text models, saved as HF folders: arch -> path."""
    import pipeline
    root = tmp_path_factory.mktemp("tiny_models")
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = pipeline.build_tiny_text_model(str(root / arch), arch)
        return cache[arch]
    return get
