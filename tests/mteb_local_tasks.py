"""Two mteb tasks with their data built in memory (no downloads), for tests/test_mteb_eval.py, which runs them as
`evaluate.py --task=mteb --tasks=tests/mteb_local_tasks.py:NoiseT2I,...`: text -> image retrieval (MIEB's
Any2AnyRetrieval, what mteb scores the released LLM2CLIP models on) and text -> text retrieval (an MTEB text task)."""
import numpy as np
from datasets import Dataset
from PIL import Image

from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata

N = 8
WORDS = "red green blue small large circle square dog cat on a the table".split()


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(N)]


def captions(seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(N)]


def metadata(name, category, modalities):
    return TaskMetadata(name=name, type="Any2AnyRetrieval" if "i" in category else "Retrieval", category=category,
                        modalities=modalities, main_score="mrr_at_10", description="a local test task",
                        reference="https://github.com/embeddings-benchmark/mteb", dataset={"path": "NA", "revision": "NA"},
                        eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=[],
                        domains=[], task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
                        sample_creation="found", bibtex_citation="")


def split(queries, corpus):
    """Query i's one relevant document is document i."""
    return RetrievalSplitData(queries=Dataset.from_dict({"id": [f"q{i}" for i in range(N)], **queries}),
                              corpus=Dataset.from_dict({"id": [f"d{i}" for i in range(N)], **corpus}),
                              relevant_docs={f"q{i}": {f"d{i}": 1} for i in range(N)}, top_ranked=None)


class NoiseT2I(AbsTaskRetrieval):
    metadata = metadata("LocalNoiseT2I", "t2i", ["image", "text"])

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": split({"text": captions(1)}, {"image": images()})}}
        self.data_loaded = True


class CaptionsT2T(AbsTaskRetrieval):
    metadata = metadata("LocalCaptionsT2T", "t2t", ["text"])

    def load_data(self, num_proc=None, **kwargs):
        self.dataset = {"default": {"test": split({"text": captions(1)}, {"text": captions(2)})}}
        self.data_loaded = True
