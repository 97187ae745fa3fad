"""The one definition of the benchmark commands: `teal bench kernels` and `teal bench decode` (`teal.cli`
registers `bench_app`) are the same commands as `python -m teal.bench.kernels` and `python -m
teal.bench.decode` (the packages' `__main__` modules run them through `teal.bench.entry`).

Choices are Enums, so `--help` lists them; comma lists (`--sparsity`, `--modes`, ...) are checked against
their choices here. Older spellings stay accepted as aliases (`--sparsities`, `--batches`, `--thresholds`).
Importing this module imports typer only (no torch), so `teal --help` stays fast.
"""

from __future__ import annotations

import enum
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

import typer


# The choices, spelled here so that --help needs no torch import; tests/test_cli.py checks that they equal
# the engine's and the benchmarks' own constants.
class Shape(str, enum.Enum):
    """Random-weight model shapes of the decode benchmark (`teal.engine.SHAPES`)."""

    llama_3_8b = "llama-3-8b"
    llama_3_1_8b = "llama-3.1-8b"
    llama_2_7b = "llama-2-7b"
    mistral_7b = "mistral-7b"
    llama_2_70b = "llama-2-70b"
    llama_3_70b = "llama-3-70b"
    gemma_3_1b = "gemma-3-1b"
    gemma_3_12b = "gemma-3-12b"
    tiny_llama = "tiny-llama"
    tiny_gemma3 = "tiny-gemma3"


KERNEL_SHAPES = ("llama-3-8b", "llama-2-7b", "llama-2-70b-tp2", "gemma-3-12b")  # teal.bench.kernels.SHAPES
MODES = ("eager", "graph", "compiled-graph")  # teal.engine.MODES
SPARSE_PATHS = ("kernel", "producer")  # teal.engine.projection.SPARSE_PATHS
ALL_REDUCES = ("auto", "nccl", "symm_mem")  # "auto" and teal.engine.collectives.ALL_REDUCES
WEIGHT_FORMATS = ("bf16", "int8", "int4")  # teal.quant.WEIGHT_FORMATS
INT4_GROUP_SIZES = (32, 64, 128)  # teal.quant.INT4_GROUP_SIZES


class Dtype(str, enum.Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


class QuantMethod(str, enum.Enum):
    """How int4 scales and zeros are chosen (`teal.quant.INT4_METHODS`)."""

    rtn = "rtn"
    hqq = "hqq"


class KernelDtype(str, enum.Enum):
    bf16 = "bf16"
    fp16 = "fp16"


class Attention(str, enum.Enum):
    default = "default"
    fused = "fused"
    torch = "torch"


class TpBuild(str, enum.Enum):
    auto = "auto"
    full = "full"
    shard = "shard"


class TuneFamilies(str, enum.Enum):
    auto = "auto"
    cuda = "cuda"
    all = "all"
    gather = "gather"


def floats(text: str, name: str) -> list[float]:
    """Comma-separated sparsities in [0, 1)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{name} is empty")
    for v in values:
        if not 0.0 <= v < 1.0:
            raise typer.BadParameter(f"{name}: {v} is outside [0, 1)")
    return values


def ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{name} must list integers >= 1, got {text!r}")
    return values


def choices(text: str, name: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma list whose every entry is one of `allowed`."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise typer.BadParameter(f"{name} takes a comma list of {', '.join(allowed)}; got {text!r}")
    return values


MASKS_HELP = ("survivor masks, a comma list: random (uniform) and/or real:PROFILE (a keep profile file, or a name "
              "under benchmarks/profiles/, e.g. real:smollm2-135m: masks drawn from a real model's per-channel keep "
              "frequencies, stretched to the shape's widths); each is timed at every sparsity > 0")


def mask_sources(text: str, sparsities: list[float]) -> list[Any]:
    """The `--masks` sources (`teal.bench.masks.parse_masks`), each checked to hold every sparsity > 0."""
    from teal.keep_profile import KeepProfileError
    from teal.bench.masks import parse_masks

    try:
        sources = parse_masks(text)
        for source in sources:
            source.check_levels(sparsities)
    except KeepProfileError as err:
        raise typer.BadParameter(str(err)) from None
    return sources


def group_size_option(value: Optional[int]) -> Optional[int]:
    if value is not None and value not in INT4_GROUP_SIZES:
        raise typer.BadParameter(f"the int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                                 f"got {value}")
    return value


WEIGHTS_HELP = ("comma list of projection weight formats to time: bf16 | int8 (per output channel) | int4 (group-wise, "
                "--group-size); every row of the JSON carries its `weights`")
DEFAULT_GROUP_SIZE = 128
GroupSizeOpt = typer.Option(None, callback=group_size_option, show_default=False,
                            help="int4 group size along the input: 32 | 64 | 128 (default 128; with int4 in --weights "
                                 "only)")


def resolve_group_size(formats: list[str], group_size: Optional[int]) -> int:
    """--group-size against --weights, before any work: given with no int4 among the formats (bf16 and int8 have
    no groups) it is one line (exit code 2) instead of being ignored; not given, int4's default 128."""
    if group_size is None:
        return DEFAULT_GROUP_SIZE
    if "int4" not in formats:
        raise typer.BadParameter(f"--group-size applies to --weights int4 only; --weights {','.join(formats)} has no "
                                 "groups: drop --group-size, or name int4 in --weights", param_hint="--group-size")
    return group_size


def check_quant_env(formats: list[str]) -> None:
    """The quantized path's environment switches ($TEAL_QUANT_KERNEL, $TEAL_QUANT_LARGE_BATCH, read by
    `teal.kernels.quant_gemv` when the first quantized product runs), checked before any work where a format is
    quantized: a bad value is one line (exit code 2) naming the variable and its values, not a traceback after
    the bf16 rows were timed."""
    if all(f == "bf16" for f in formats):
        return
    from teal.kernels import quant_gemv

    for choice in (quant_gemv.quant_kernel_choice, quant_gemv.large_batch_choice):
        try:
            choice()
        except ValueError as e:
            raise typer.BadParameter(f"{e}; set it to one of those or unset it") from None


QuantMethodOpt = typer.Option(QuantMethod.rtn, "--quant-method",
                              help="how the int4 scales and zeros are chosen: rtn (round to nearest) | hqq (HQQ's "
                                   "optimiser; the quant extra: pip install 'teal-sparsity[quant]'); the same "
                                   "kernels and bytes, other codes; int8 is rtn")


def check_quant_method(formats: list[str], quant_method: QuantMethod) -> None:
    """--quant-method against --weights (`teal.quant.check_method`), before any work: hqq needs int4 among the
    formats and the hqq package; one line (exit code 2) otherwise."""
    from teal.quant import check_method

    if quant_method.value != "rtn" and "int4" not in formats:
        raise typer.BadParameter(f"--quant-method {quant_method.value} is for int4 weights; add int4 to --weights",
                                 param_hint="--quant-method")
    try:
        check_method("int4" if "int4" in formats else "bf16", quant_method.value)
    except (ValueError, ImportError) as e:
        raise typer.BadParameter(str(e), param_hint="--quant-method") from None


def require_cuda(command: str) -> None:
    """Exit 2 with one line when no CUDA GPU is visible."""
    import torch

    if not torch.cuda.is_available():
        typer.echo(f"error: {command} runs on a CUDA GPU and none is visible to torch; run it on a GPU machine "
                   "(decode: --device cpu --shape tiny-llama for a smoke test)", err=True)
        raise typer.Exit(2)


def _command(ctx: typer.Context) -> str:
    """The command line as given, for the result JSON."""
    return ctx.find_root().info_name + " " + shlex.join(sys.argv[1:])


bench_app = typer.Typer(help="GPU speed benchmarks.", no_args_is_help=True)


@bench_app.command("kernels")
def kernels_command(
    ctx: typer.Context,
    shapes: str = typer.Option("llama-3-8b,llama-2-7b", help=f"comma list of {', '.join(KERNEL_SHAPES)}"),
    sparsity: str = typer.Option("0,0.25,0.4,0.5,0.65,0.8,0.9", "--sparsity", "--sparsities",
                                 help="comma list of sparsities in [0, 1)"),
    batch: str = typer.Option("1,2,4,8", "--batch", "--batches", help="comma list of batch sizes"),
    dtype: KernelDtype = typer.Option(KernelDtype.bf16, help="activation and weight dtype of the kernels"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results here"),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="write a time-vs-sparsity figure here"),
    tune: bool = typer.Option(False, "--tune", help="tune configurations for this GPU first (prints table entries)"),
    tune_families: TuneFamilies = typer.Option(
        TuneFamilies.auto, help="candidates: the CUDA C++ kernel's (cuda), every Triton family (all), the gather "
                                "path against the table's entry (gather, batch 1); auto: cuda where the CUDA C++ "
                                "kernel runs, else all"),
    tune_sparsities: Optional[str] = typer.Option(
        None, help="sparsities the tuner scores candidates at (default 0,0.5,0.9 for cuda, else 0,0.5)"),
    tune_batches: str = typer.Option("1", help="batch buckets to tune (comma list, e.g. 1,2,4)"),
    table_out: Optional[Path] = typer.Option(None, help="write the tuned table here; use it with "
                                                        "TEAL_KERNEL_CONFIGS=PATH (with --quant-configs sweep: "
                                                        "the quantized winners, for TEAL_QUANT_CONFIGS=PATH)"),
    time_budget: Optional[float] = typer.Option(None, help="seconds; later projections are skipped"),
    check: bool = typer.Option(True, "--check/--no-check", help="the GPU self-check before timing"),
    masks: str = typer.Option("random", "--masks", help=MASKS_HELP),
    weights: str = typer.Option("bf16", help=WEIGHTS_HELP + " (int8 / int4: the fused quantized kernel, checked "
                                             "against a float64 dequantize-then-multiply reference first)"),
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    quant_kernels: Optional[str] = typer.Option(
        None, help="comma list of the quantized kernels to time: cuda, triton (default: both)"),
    quant_configs: str = typer.Option(
        "default", help="default: the CUDA quantized kernel at the dispatch's configuration; sweep: also at every "
                        "candidate configuration (each checked against float64 first), printing the "
                        "TUNED_QUANT_CUDA entries of those that win"),
) -> None:
    """Sparse GEMV kernels vs cuBLAS, the naive baseline and copy bandwidth (needs CUDA); --tune fits the
    tables to this GPU."""
    from teal.bench.quant_kernels import KERNEL_NAMES, QUANT_CONFIG_MODES

    shape_list = choices(shapes, "--shapes", KERNEL_SHAPES)
    kernel_names = None if quant_kernels is None else choices(quant_kernels, "--quant-kernels", KERNEL_NAMES)
    if quant_configs not in QUANT_CONFIG_MODES:
        raise typer.BadParameter(f"--quant-configs takes {' or '.join(QUANT_CONFIG_MODES)}, got {quant_configs!r}",
                                 param_hint="--quant-configs")
    formats = choices(weights, "--weights", WEIGHT_FORMATS)
    if quant_configs == "sweep" and formats == ["bf16"]:
        raise typer.BadParameter("--quant-configs sweep times the quantized kernel: add int8 or int4 to --weights",
                                 param_hint="--quant-configs")
    if quant_configs == "sweep" and tune and table_out is not None:
        raise typer.BadParameter("--table-out takes one table: drop --tune or --quant-configs sweep (run them apart)",
                                 param_hint="--table-out")
    group_size = resolve_group_size(formats, group_size)
    check_quant_method(formats, quant_method)
    sparsities, batches = floats(sparsity, "--sparsity"), ints(batch, "--batch")
    buckets = ints(tune_batches, "--tune-batches")
    sources = mask_sources(masks, sparsities)
    require_cuda("teal bench kernels")
    import torch

    from teal.bench import kernels
    from teal.kernels.ops import cuda_kernel_available

    families = tune_families.value
    if families == "auto":
        families = "cuda" if cuda_kernel_available(torch.device("cuda")) else "all"
    tune_s = (floats(tune_sparsities, "--tune-sparsities") if tune_sparsities is not None
              else [0.0, 0.5, 0.9] if families == "cuda" else [0.0, 0.5])
    data = kernels.run(shape_list, sparsities, batches, json_path=str(json_path) if json_path else None,
                       dtype=dtype.value, tune=tune, tune_families=families, tune_batches=buckets,
                       tune_sparsities=tune_s, table_out=str(table_out) if table_out else None,
                       time_budget_s=time_budget, check=check, command=_command(ctx), masks=sources,
                       weights=formats, group_size=group_size, quant_method=quant_method.value,
                       quant_kernels=kernel_names, quant_configs=quant_configs)
    if plot_path is not None:
        kernels.plot(data, plot_path)


@bench_app.command("decode")
def decode_command(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, help="model to load (else --shape, random weights)"),
    shape: Shape = typer.Option(Shape.llama_3_8b, help="random-weight shape (without --model)"),
    sparsity: str = typer.Option("0,0.25,0.4,0.5,0.65", "--sparsity", "--sparsities",
                                 help="comma list of sparsities in [0, 1) (0 is always timed)"),
    artifact: Optional[Path] = typer.Option(None, "--artifact", "--thresholds",
                                            help="thresholds artifact directory (with --model)"),
    prompt_len: int = typer.Option(128, min=1, help="prompt tokens before the timed decode"),
    new_tokens: int = typer.Option(256, min=2, help="decode steps timed per repeat"),
    repeats: int = typer.Option(3, min=1, help="timed repeats"),
    modes: str = typer.Option("graph,compiled-graph", help=f"comma list of decode modes to time: {', '.join(MODES)}"),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="also time HF generate (static cache, and eager)"),
    hf_eager_tokens: int = typer.Option(32, min=0, help="tokens for the eager HF baseline (0: skip it)"),
    device: str = typer.Option("cuda", help="cuda, cuda:N, or cpu (a smoke test: --shape tiny-llama)"),
    dtype: Dtype = typer.Option(Dtype.bfloat16, help="engine dtype"),
    time_budget: float = typer.Option(480.0, help="seconds; later settings are skipped after"),
    profile: bool = typer.Option(True, "--profile/--no-profile", help="the torch.profiler kernel breakdown"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results here"),
    tp: int = typer.Option(1, "--tp", min=1, help="tensor-parallel GPUs of this host (spawned; or torchrun)"),
    tp_build: TpBuild = typer.Option(
        TpBuild.auto, help="with --tp: full (whole engine, then shards; checks against one device) | shard (each "
                           "rank builds only its shard: random slices of --shape, or its slices of --model's "
                           "safetensors) | auto"),
    all_reduce: str = typer.Option("auto", help=f"with --tp: comma list of all-reduces to time: "
                                                f"{', '.join(ALL_REDUCES)} (auto: symm_mem where it can be set up)"),
    sparse_path: Optional[str] = typer.Option(
        None, help=f"comma list of sparse paths to time: {', '.join(SPARSE_PATHS)} (default: the engine's: kernel "
                   "where the CUDA C++ GEMV runs, else producer on one GPU)"),
    attention: Attention = typer.Option(Attention.default, help="decode attention: the engine's default, the "
                                                                "split-KV op (fused) or compiled torch code"),
    masks: str = typer.Option("random", "--masks", help=MASKS_HELP + "; real: the random-weight shape's channels "
                              "are scaled so that its survivors follow the profile (not with --model/--artifact)"),
    mask_steps: int = typer.Option(64, min=0, help="decode steps whose survivor masks each (sparsity, masks) "
                                                   "report describes: imbalance, keep rate, fit (0: no report; runs with real:… masks only)"),
    weights: str = typer.Option("bf16", help=WEIGHTS_HELP + "; bf16 is always timed (the ratios' reference), each "
                                             "quantized format after a correctness check against float64"),
    group_size: Optional[int] = GroupSizeOpt,
    quant_method: QuantMethod = QuantMethodOpt,
    torchao: bool = typer.Option(True, "--torchao/--no-torchao",
                                 help="with int8/int4: also time torchao's weight-only config of that format in HF "
                                      "static-cache generate (where torchao imports; a failure is recorded)"),
) -> None:
    """End-to-end decode tokens/s: engine dense and sparse, HF generate, roofline (needs CUDA; --device cpu for a
    smoke test)."""
    sparsities = floats(sparsity, "--sparsity")
    mode_list = choices(modes, "--modes", MODES)
    reduces = choices(all_reduce, "--all-reduce", ALL_REDUCES)
    paths = None if sparse_path is None else choices(sparse_path, "--sparse-path", SPARSE_PATHS)
    sources = mask_sources(masks, [s for s in sparsities if s > 0])
    if any(not m.is_random for m in sources) and (model is not None or artifact is not None or tp != 1):
        raise typer.BadParameter("--masks real:PROFILE shapes a random-weight model (--shape, one GPU); a real "
                                 "model (--model), a thresholds artifact or --tp: use --masks random")
    formats = choices(weights, "--weights", WEIGHT_FORMATS)
    if tp > 1 and formats != ["bf16"]:
        raise typer.BadParameter("quantized weights are not supported with --tp above 1", param_hint="--weights")
    group_size = resolve_group_size(formats, group_size)
    check_quant_method(formats, quant_method)
    check_quant_env(formats)
    if device.startswith("cuda"):
        require_cuda("teal bench decode")
    import torch

    from teal.bench import decode

    thresholds = None
    if artifact is not None:
        from teal import Thresholds
        from teal.quant import weights_mismatch

        thresholds = Thresholds.load(artifact)
        for fmt in formats:  # the formats asked for (teal calibrate's check, as in teal.cli.check_weights)
            message = weights_mismatch(thresholds.calibration, fmt, group_size,
                                       quant_method.value if fmt == "int4" else "rtn")
            if message:
                typer.echo(f"warning: {fmt}: {message}", err=True)
    decode.run(model=model, shape=None if model else shape.value, sparsities=sparsities, prompt_len=prompt_len,
               new_tokens=new_tokens, repeats=repeats, json_path=str(json_path) if json_path else None,
               thresholds=thresholds, modes=tuple(mode_list), hf_baselines=hf, hf_eager_tokens=hf_eager_tokens,
               device=device, dtype=getattr(torch, dtype.value), time_budget_s=time_budget, profile=profile,
               command=_command(ctx), tp=tp, sparse_paths=paths,
               fused_attention={"default": None, "fused": True, "torch": False}[attention.value],
               tp_build=tp_build.value, all_reduces=reduces, masks=sources, mask_steps=mask_steps,
               weights=formats, group_size=group_size, torchao=torchao, quant_method=quant_method.value)


def run_command(name: str, argv: list[str] | None) -> Any:
    """`python -m teal.bench.<name>` (`teal.bench.entry`): the `teal bench <name>` command under that program
    name."""
    command = typer.main.get_command(bench_app).commands[name]  # type: ignore[attr-defined]
    return command.main(args=argv, prog_name=f"python -m teal.bench.{name}")
