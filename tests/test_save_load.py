"""A sparsified model survives save_pretrained: teal.load_model and AutoModelForCausalLM give the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import teal
from teal.artifact import ArtifactError
from teal.nn import TealLinear
from conftest import random_windows, tiny_model


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def tokenizer_files():
    """A real tokenizer to save beside the tiny models (teal.load_model reads one)."""
    from transformers import AutoTokenizer

    from teal.models import _alias_dir

    return AutoTokenizer.from_pretrained(str(_alias_dir("smollm2-135m")))


@pytest.mark.parametrize("score,method", [("magnitude", "uniform"), ("weight-aware", "greedy")])
def test_round_trip_bit_identical(tmp_path, tokenizer_files, score, method):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    windows = random_windows(4, 64)
    th = teal.calibrate(model, None, windows=windows, score=score, progress=False)
    if method == "greedy":
        teal.allocate(model, th, "greedy", windows=windows[:2, :32], step=0.05, max_level=0.7, progress=False)
    dense = _logits(model, windows)
    teal.sparsify_(model, th, 0.5, method=method, prefill="sparse")
    want = _logits(model, windows)
    assert not torch.equal(want, dense)
    model.save_pretrained(tmp_path)
    tokenizer_files.save_pretrained(tmp_path)

    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "teal" and qc["sparsity"] == 0.5 and qc["method"] == method

    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), teal.load_model(str(tmp_path))[0]):
        mods = [m for m in loaded.modules() if isinstance(m, TealLinear)]
        assert len(mods) == 2 * 7
        assert torch.equal(_logits(loaded, windows), want)
    assert loaded.teal_sparsity["method"] == method
    # the thresholds came along: the same artifact, usable at other levels
    back = teal.Thresholds.from_pretrained(tmp_path)
    assert back.thresholds(0.3, method) == th.thresholds(0.3, method)


def test_checkpoint_keeps_the_dense_weight_names(tmp_path):
    """Before: `*.q_proj.linear.weight` in the file, and from_pretrained random-initialised every projection."""
    model = tiny_model("llama")
    windows = random_windows(2, 32)
    dense = _logits(model, windows)
    th = teal.calibrate(model, None, windows=windows, progress=False)
    teal.sparsify_(model, th, 0.5)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not any(".linear." in k for k in keys)
    # transformers without teal: the dense model, not random projections
    torch.save(windows, tmp_path / "ids.pt")
    torch.save(dense, tmp_path / "dense.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "assert 'teal' not in sys.modules\n"
        "with torch.inference_mode(): got = m(input_ids=torch.load(sys.argv[1] + '/ids.pt'), use_cache=False).logits\n"
        "assert torch.equal(got, torch.load(sys.argv[1] + '/dense.pt')), (got - torch.load(sys.argv[1] + '/dense.pt')).abs().max()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_densify_saves_a_plain_model(tmp_path):
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    teal.sparsify_(model, th, 0.5)
    teal.densify_(model)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


def test_thresholds_save_and_from_pretrained(tmp_path, monkeypatch):
    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    th.save_pretrained(tmp_path / "art")
    assert teal.Thresholds.from_pretrained(tmp_path / "art", model=model).thresholds(0.5) == th.thresholds(0.5)

    # a hub id, offline: one clear line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ArtifactError, match="hub is offline"):
        teal.Thresholds.from_pretrained("someone/teal-thresholds")
    # online: resolved through huggingface_hub.snapshot_download
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    import huggingface_hub

    from teal import models as teal_models

    monkeypatch.setattr(teal_models, "_offline", lambda: False)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path / "art"))
    got = teal.Thresholds.from_pretrained("someone/teal-thresholds", revision="v1")
    assert got.thresholds(0.5) == th.thresholds(0.5)
    assert calls[0][0] == "someone/teal-thresholds" and calls[0][1]["revision"] == "v1"


def test_push_to_hub_uploads_the_artifact(tmp_path, monkeypatch):
    import huggingface_hub

    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, commit_message):
            uploaded["repo"] = repo_id
            uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
            return type("Info", (), {"commit_url": f"hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert th.push_to_hub("me/th") == "hub/me/th/commit/1"
    assert uploaded == {"repo": "me/th", "files": ["teal_config.json", "teal_histograms.safetensors"]}


def test_round_trip_of_the_real_smollm2(smollm2, smollm2_thresholds, tmp_path):
    """The issue's own case: SmolLM2-135M (30 layers) sparsified at 0.5 greedy, saved, loaded back by
    `AutoModelForCausalLM.from_pretrained` after `import teal`: every projection wrapped again and the fp32
    logits bit-identical (before the fix, every projection weight of all 30 layers came back random)."""
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    ids = tok("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    teal.sparsify_(model, smollm2_thresholds, 0.5, method="greedy", prefill="sparse")
    try:
        want = _logits(model, ids)
        model.save_pretrained(tmp_path)
    finally:
        teal.densify_(model)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert sum(isinstance(m, TealLinear) for m in loaded.modules()) == 30 * 7
    assert torch.equal(_logits(loaded, ids), want)
