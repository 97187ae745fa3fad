"""The `teal` command end to end on a small token budget (real SmolLM2, cached)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from teal.cli import app

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2):
    out = tmp_path_factory.mktemp("cli") / "art"
    # the tests run at 0.5: one sequential level (the default grid has nine, each a pass per allocation method)
    r = invoke("calibrate", "smollm2-135m", "-o", out, "--tokens", 2048, "--seq-len", 512, "--levels", 0.5)
    assert r.exit_code == 0, r.output
    assert (out / "teal_config.json").is_file() and (out / "teal_histograms.safetensors").is_file()
    r = invoke("allocate", "smollm2-135m", out, "--tokens", 128, "--seq-len", 128, "--step", 0.05,
               "--max-level", 0.5, "--lazy")
    assert r.exit_code == 0, r.output
    assert "greedy" in json.loads((out / "teal_config.json").read_text())["allocations"]
    return out


def test_eval_ppl_json_and_plot(artifact, tmp_path):
    js = tmp_path / "ppl.json"
    r = invoke("eval", "ppl", "smollm2-135m", artifact, "--sparsity", "0,0.5",
               "--method", "uniform,greedy", "--tokens", 1024, "--seq-len", 512, "--json", js)
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert data["model"] == "smollm2-135m" and data["data"] == "olmo-wiki"
    rows = {(x["method"], x["sparsity"]): x for x in data["results"]}
    assert set(rows) == {("teal-uniform", 0), ("teal-uniform", 0.5), ("teal-greedy", 0),
                         ("teal-greedy", 0.5)}
    assert rows[("teal-uniform", 0.5)]["ppl"] > rows[("teal-uniform", 0)]["ppl"]
    assert abs(rows[("teal-uniform", 0.5)]["measured_sparsity"] - 0.5) < 0.05
    assert "teal-greedy" in r.output
    png = tmp_path / "ppl.png"
    r = invoke("plot", js, "-o", png)
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_tasks_table_and_json(artifact, tmp_path):
    """A hand-made task (acc_norm reported) and winogrande (partial evaluation: no acc_norm, headline acc)."""
    task = tmp_path / "capitals.jsonl"
    task.write_text("\n".join(json.dumps(x) for x in [
        {"context": "The capital of France is", "choices": ["Paris.", "a small green frog."], "gold": 0},
        {"context": "Two plus two equals", "choices": ["the moon.", "four."], "gold": 1},
    ]) + "\n")
    js = tmp_path / "tasks.json"
    r = invoke("eval", "tasks", "smollm2-135m", artifact, "--sparsity", "0,0.5", "--tasks", f"file:{task},winogrande",
               "--limit", 3, "--json", js)
    assert r.exit_code == 0, r.output
    data = json.loads(js.read_text())
    assert [(x["method"], x["sparsity"]) for x in data["results"]] == [("teal-uniform", 0), ("teal-uniform", 0.5)]
    for row in data["results"]:
        per = row["tasks"]
        assert per["winogrande"]["acc_norm"] is None and per["winogrande"]["metric"] == "acc"
        assert per["winogrande"]["n"] == 3 and per[f"file:{task}"]["n"] == 2
        assert row["average"] == pytest.approx((per["winogrande"]["acc"] + per[f"file:{task}"]["score"]) / 2)
    assert data["results"][0]["measured_sparsity"] == 0.0
    assert abs(data["results"][1]["measured_sparsity"] - 0.5) < 0.1
    assert "winogrande" in r.output and "(acc)" in r.output and "–" not in r.output


@pytest.mark.parametrize("name", ["2026-11-29-h200-kernels-cuda-batched.json", "2026-11-29-h200-decode-cuda-final.json"])
def test_plot_draws_committed_bench_results(name, tmp_path):
    """`teal plot` on the benchmarks' own JSON: kernels (time vs sparsity panels) and decode (tok/s)."""
    from pathlib import Path

    import matplotlib.image

    src = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / name
    png = tmp_path / "bench.png"
    r = invoke("plot", src, "-o", png)
    assert r.exit_code == 0, r.output
    image = matplotlib.image.imread(png)
    rgb = image[..., :3]
    colored = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3  # data lines; empty axes are black, white and grey
    assert colored.mean() > 0.002


def test_plot_refuses_results_without_the_metric(tmp_path):
    js = tmp_path / "odd.json"
    js.write_text(json.dumps({"results": [{"method": "x", "sparsity": 0.5}]}))
    r = invoke("plot", js, "-o", tmp_path / "odd.png")
    assert r.exit_code != 0
    assert "no result row has 'ppl'" in (r.output + str(r.exception))
    assert not (tmp_path / "odd.png").exists()


def test_generate(artifact):
    r = invoke("generate", "smollm2-135m", artifact, "--sparsity", 0.5, "--prompt",
               "The capital of France is", "--max-new-tokens", 6, "--no-chat-template")
    assert r.exit_code == 0, r.output
    assert "The capital of France is" in r.output and "measured sparsity" in r.output


def test_generate_with_the_engine_streams_text(artifact):
    """`--engine` on the CPU: the decode engine (eager), text streamed after the prompt, allocation methods."""
    r = invoke("generate", "smollm2-135m", "--engine", "--prompt", "The capital of France is",
               "--max-new-tokens", 6, "--no-chat-template")
    assert r.exit_code == 0, r.output
    dense_hf = invoke("generate", "smollm2-135m", "--prompt", "The capital of France is", "--max-new-tokens", 6,
                      "--no-chat-template")
    # greedy, dense, fp32: the engine writes HF generate's text, not token ids
    def text(output: str) -> str:  # from the prompt to the timing line (progress bars may come before)
        return output[output.index("The capital of France is"):].split("\n[")[0].strip()

    assert text(r.output) == text(dense_hf.output) and len(text(r.output)) > len("The capital of France is")
    assert "tok/s; decode eager, dense products, sparsity setting 0]" in " ".join(r.output.split())
    for method in ("uniform", "greedy"):
        r = invoke("generate", "smollm2-135m", artifact, "--engine", "--sparsity", 0.5, "--method", method,
                   "--prompt", "The capital of France is", "--max-new-tokens", 4, "--no-chat-template")
        assert r.exit_code == 0, r.output
        flat = " ".join(r.output.split())  # rich wraps the summary line
        assert "The capital of France is" in flat and "; decode eager, 120/120 projection groups" in flat
        assert "sparsity setting 0.5]" in flat
    # a thresholded prompt (--prefill sparse): the engine writes what the sparsified HF model does
    sparse_args = ("--sparsity", 0.5, "--prefill", "sparse", "--prompt", "The capital of France is",
                   "--max-new-tokens", 6, "--no-chat-template")
    engine_sparse = invoke("generate", "smollm2-135m", artifact, "--engine", *sparse_args)
    hf_sparse = invoke("generate", "smollm2-135m", artifact, *sparse_args)
    assert engine_sparse.exit_code == 0 and hf_sparse.exit_code == 0, engine_sparse.output + hf_sparse.output
    assert text(engine_sparse.output) == text(hf_sparse.output)
    r = invoke("generate", "smollm2-135m", artifact, "--prefill", "half")
    assert r.exit_code != 0 and "--prefill" in _message(r) and "'half' is not one of 'sparse', 'dense'" in _message(r)
    r = invoke("generate", "smollm2-135m", "--engine", "--sparsity", 0.5)
    assert r.exit_code != 0 and "needs a thresholds artifact" in _message(r)
    r = invoke("generate", "smollm2-135m", artifact, "--engine", "--sparsity", 0.5, "--method", "nosuch")
    assert r.exit_code != 0 and "no 'nosuch' allocation" in str(r.exception or r.output)


def test_bad_input_is_named(artifact, tmp_path):
    r = invoke("eval", "ppl", "smollm2-135m", artifact, "--sparsity", "0.5,1.2")
    assert r.exit_code != 0 and "1.2 is not a sparsity in [0, 1)" in _message(r)
    r = invoke("calibrate", "smollm2-135m", "-o", tmp_path / "x", "--data", "nosuchsource",
               "--tokens", 64)
    assert r.exit_code != 0 and "unknown text source 'nosuchsource'" in _message(r)
    r = invoke("eval", "ppl", "smollm2-135m", tmp_path / "missing", "--sparsity", "0.5")
    assert r.exit_code != 0 and "does not exist" in str(r.exception)
    r = invoke("eval", "ppl", "smollm2-135m", artifact, "--sparsity", "0.5",
               "--method", "lagrange", "--tokens", 512, "--seq-len", 512)
    assert r.exit_code != 0 and "no 'lagrange' allocation" in str(r.exception)


def _message(result) -> str:
    """The command's output as one line of words (rich draws errors in a wrapped box)."""
    return " ".join(result.output.replace("│", " ").split())


def test_score_option_and_method_labels_check_the_artifact(artifact, tmp_path):
    """--score and result labels (teal-/wa-) name the threshold rule; the artifact holds magnitude scores."""
    r = invoke("eval", "ppl", "smollm2-135m", artifact, "--sparsity", "0.5", "--score", "weight-aware",
               "--tokens", 512, "--seq-len", 512)
    assert r.exit_code != 0
    assert "holds magnitude scores" in _message(r) and "--score weight-aware" in _message(r)
    r = invoke("eval", "ppl", "smollm2-135m", artifact, "--sparsity", "0.5", "--method", "wa-greedy",
               "--tokens", 512, "--seq-len", 512)
    assert r.exit_code != 0 and "holds magnitude scores" in _message(r)
    r = invoke("generate", "smollm2-135m", artifact, "--sparsity", "0.5", "--score", "weightaware")
    assert r.exit_code != 0 and "--score must be one of" in _message(r)
    js = tmp_path / "ppl.json"
    r = invoke("eval", "ppl", "smollm2-135m", artifact, "--sparsity", "0.5", "--method", "teal-greedy,uniform",
               "--score", "magnitude", "--tokens", 512, "--seq-len", 512, "--json", js)
    assert r.exit_code == 0, r.output
    assert [x["method"] for x in json.loads(js.read_text())["results"]] == ["teal-greedy", "teal-uniform"]


def test_bench_decode_rejects_unknown_attention_mode():
    result = runner.invoke(app, ["bench", "decode", "--attention", "bogus"])
    assert result.exit_code == 2
    assert "'bogus' is not one of 'default', 'fused', 'torch'" in _plain(result.output)


def test_engine_refuses_thresholds_of_another_model(artifact):
    import teal
    from transformers import AutoConfig, AutoModelForCausalLM

    from teal.artifact import ArtifactError
    from teal.engine import Generator

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    other = AutoModelForCausalLM.from_config(config).eval()
    th = teal.Thresholds.load(artifact)
    with pytest.raises(ArtifactError, match="calibrate this model first"):
        Generator.from_pretrained(other, thresholds=th, sparsity=0.5, device="cpu")
    with pytest.raises(ValueError, match="needs a teal.Thresholds artifact"):
        Generator.from_pretrained(other, thresholds={"layers.0.q": 0.1}, sparsity=0.5, device="cpu", method="greedy")


def test_bench_commands_need_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    for cmd in (["bench", "kernels", "--batch", "1"], ["bench", "decode"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2
        assert "runs on a CUDA GPU and none is visible" in result.output


def test_bench_kernels_rejects_unknown_tune_family():
    result = runner.invoke(app, ["bench", "kernels", "--tune", "--tune-families", "bogus"])
    assert result.exit_code == 2 and "'bogus' is not one of 'auto', 'cuda', 'all', 'gather'." in _plain(
        result.output)


def _plain(text: str) -> str:
    """Help and error text without rich's box drawing, colours and line wrapping."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def _module_help(name: str) -> str:
    """`python -m teal.bench.<name> --help`, as a user runs it (the package's `__main__.py`), on this tree."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "COLUMNS": "400", "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", f"teal.bench.{name}", "--help"], capture_output=True, text=True,
                          env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    return _plain(done.stdout)


@pytest.mark.parametrize("name, listed", [
    ("decode", ["llama-3-8b", "gemma-3-12b", "tiny-llama", "bfloat16", "float16", "float32", "default", "fused",
                "torch", "auto", "full", "shard", "compiled-graph", "producer", "symm_mem", "--sparsities",
                "--thresholds", "--no-profile", "--hf-eager-tokens"]),
    ("kernels", ["bf16", "fp16", "auto", "cuda", "all", "gather", "llama-2-70b-tp2", "--sparsities",
                 "--batches", "--no-check", "--tune-sparsities"]),
])
def test_bench_help_lists_the_choices_and_both_entry_points_are_one_command(name, listed, monkeypatch):
    """`teal bench NAME --help` and `python -m teal.bench.NAME --help` list the same options and choices."""
    from teal.bench.cli import bench_app

    monkeypatch.setenv("COLUMNS", "400")  # rich wraps and truncates help at the terminal's width

    result = runner.invoke(app, ["bench", name, "--help"])
    assert result.exit_code == 0
    via_teal = _plain(result.output)
    via_module = _module_help(name)
    assert "Usage: python -m teal.bench." + name in via_module
    assert via_teal.split("[OPTIONS]", 1)[1] == via_module.split("[OPTIONS]", 1)[1]
    for word in listed:
        assert word in via_teal, word
    assert any(g.typer_instance is bench_app for g in app.registered_groups)


def test_bench_choices_match_the_engine_and_kernel_benchmark():
    from teal.bench import cli, kernels
    from teal.engine import MODES, SHAPES
    from teal.engine.collectives import ALL_REDUCES
    from teal.engine.projection import SPARSE_PATHS
    from teal.kernels.tune import candidate_configs

    assert {s.value for s in cli.Shape} == set(SHAPES)
    assert set(cli.MODES) == set(MODES) and set(cli.SPARSE_PATHS) == set(SPARSE_PATHS)
    assert set(cli.ALL_REDUCES) == {"auto", *ALL_REDUCES}
    assert set(cli.KERNEL_SHAPES) == set(kernels.SHAPES)
    import typing

    import teal.cli
    from teal.quant import INT4_METHODS

    assert {m.value for m in cli.QuantMethod} == set(typing.get_args(teal.cli.QuantMethod)) == set(INT4_METHODS)
    for family in {f.value for f in cli.TuneFamilies} - {"auto"}:  # each one the tuner knows
        for batch in (1, 2):
            assert candidate_configs(4096, 4096, batch, 132, families=family), (family, batch)


HEADLINE = ["--shape", "llama-3-8b", "--sparsity", "0,0.4,0.5,0.65", "--modes", "compiled-graph", "--no-profile",
            "--hf-eager-tokens", "0"]


@pytest.mark.parametrize("args, code, message", [
    (HEADLINE, 2, "runs on a CUDA GPU and none is visible"),  # parsed; stops at the GPU check
    (["--sparsities", "0.5", "--thresholds", "nowhere", "--no-hf"], 2, "runs on a CUDA GPU"),  # old spellings
    (["--modes", "graph,fast"], 2, "--modes takes a comma list of eager, graph, compiled-graph"),
    (["--sparsity", "0.5,1.5"], 2, "1.5 is outside [0, 1)"),
    (["--shape", "llama-9"], 2, "'llama-9' is not one of"),
])
def test_bench_decode_parses_alike_through_both_entry_points(args, code, message, capsys):
    import torch

    from teal.bench.entry import run_module

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the headline command would run")
    result = runner.invoke(app, ["bench", "decode", *args])
    assert result.exit_code == code and message in _plain(result.output), result.output
    with pytest.raises(SystemExit) as exit_info:
        run_module("decode", args)
    captured = capsys.readouterr()
    assert exit_info.value.code == code and message in _plain(captured.out + captured.err)


def test_bench_module_without_typer_says_so_in_one_line(monkeypatch, capsys):
    import sys

    from teal.bench.entry import run_module

    monkeypatch.delitem(sys.modules, "teal.bench.cli", raising=False)
    monkeypatch.setitem(sys.modules, "typer", None)
    with pytest.raises(SystemExit) as exit_info:
        run_module("decode", ["--help"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err == ("error: python -m teal.bench.decode needs the typer package (pip install typer, or put its wheel "
                   "on PYTHONPATH)")


def test_serve_probe_steps_option(monkeypatch):
    """--probe-steps reaches the served model (0 turns the sparsity report off); a negative value is refused."""
    import teal.serve

    seen = {}

    def fake_build(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(teal.serve, "build_served", fake_build)
    result = runner.invoke(app, ["serve", "smollm2-135m", "--probe-steps", "0", "--device", "cpu"])
    assert result.exit_code == 0 and seen["probe_steps"] == 0, result.output
    result = runner.invoke(app, ["serve", "smollm2-135m", "--probe-steps", "-1"])
    assert result.exit_code == 2 and "--probe-steps must be 0 or more" in _message(result)


def test_demo_runs_small_and_records_what_ran(tmp_path):
    """`teal demo` end to end at a small size: the table's JSON records the commit, the date, per-phase times
    and one row per (allocation, sparsity), each with a measured sparsity near its setting."""
    out = tmp_path / "demo"
    r = invoke("demo", "--out", out, "--calib-tokens", 1024, "--eval-tokens", 512, "--seq-len", 256,
               "--greedy-tokens", 128, "--greedy-step", 0.05, "--sparsity", "0,0.5", "--calibration", "dense")
    assert r.exit_code == 0, r.output
    data = json.loads((out / "ppl.json").read_text())
    assert {"commit", "date", "timings", "command"} <= set(data)
    assert set(data["timings"]) == {"load_s", "calibrate_s", "allocate_s", "perplexity_s", "until_table_s"}
    assert sorted((row["method"], row["sparsity"]) for row in data["results"]) == [
        ("teal-greedy", 0.0), ("teal-greedy", 0.5), ("teal-uniform", 0.0), ("teal-uniform", 0.5)]
    for row in data["results"]:
        assert abs(row["measured_sparsity"] - row["sparsity"]) < 0.1 and row["ppl"] > 1
