import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# memopt's Triton kernels run on CPU tensors under Triton's interpreter where there is no GPU
# (tests/memopt/test_triton_kernels.py). Triton reads TRITON_INTERPRET when it is first imported
# (its own library is decorated then), so it is decided here, before any test imports it.
if "TRITON_INTERPRET" not in os.environ:
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def bundled_small(tmp_path_factory):
    """A slice of the bundled corpus (first 40 training documents), tokenized with the bundled
    tokenizer into GPT (document) and BERT (sentence) indexed datasets. Built once per session."""
    from pretrain.data import bundled
    from pretrain.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("bundled_small")
    docs = []
    for doc in bundled.corpus_documents("train"):
        docs.append(doc)
        if len(docs) == 40:
            break
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    gpt = preprocess([str(src)], bundled.TOKENIZER, str(root / "gpt" / "small"),
                     append_eod=True, progress=False)
    bert = preprocess([str(src)], bundled.TOKENIZER, str(root / "bert" / "small"),
                      split_sentences=True, progress=False)
    return {"root": root, "docs": docs, "jsonl": str(src), "tokenizer": bundled.TOKENIZER,
            "gpt": gpt["prefix"], "bert": bert["prefix"]}


@pytest.fixture(scope="module")
def model_parallel_tp1():
    """megatron's parallel state at TP=1 in this process (a private 1-rank gloo group).
    Torn down afterwards, unless another test had set up torch.distributed before."""
    import torch.distributed as dist

    from pretrain.models import destroy_model_parallel, init_model_parallel

    owned = not dist.is_initialized()
    init_model_parallel(1)
    yield
    destroy_model_parallel(destroy_process_group=owned)
