"""lm-evaluation-harness model ``teal``: a TEAL-sparsified model behind lm-eval's ``LM`` API.

Needs the optional dependency ``lm-eval`` (``pip install 'teal-sparsity[eval]'``); teal itself
never imports this module. lm-eval does not discover third-party models by itself, so run its
command line through this module, which registers ``--model teal`` first::

    python -m teal.eval.lm_eval_adapter --model teal \\
        --model_args pretrained=smollm2-135m,thresholds=out/smollm2,sparsity=0.5 \\
        --tasks hellaswag,arc_easy --batch_size 16

model_args: ``pretrained`` (alias, hub id, local dir or .gguf; default smollm2-135m),
``thresholds`` (artifact directory from ``teal calibrate``), ``sparsity`` (default 0),
``method`` (uniform | an allocation stored in the artifact), ``prefill`` (sparse | dense,
default sparse), ``dense_prefix``, ``dtype`` (float32 | bfloat16 | float16 | auto), ``device``,
``batch_size``, ``max_length``, ``max_gen_toks``, ``add_bos``.

From Python, ``import teal.eval.lm_eval_adapter`` and call ``lm_eval.simple_evaluate(model="teal",
model_args=...)``, or wrap a model you already hold: ``TealLM.from_model(model, tokenizer)``.
Log-likelihoods are computed by :mod:`teal.eval.tasks` with lm-eval's tokenization rules.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError(
        "teal.eval.lm_eval_adapter needs lm-evaluation-harness: "
        "pip install 'teal-sparsity[eval]' (or `pip install lm-eval`)"
    ) from e

from teal.eval.tasks import (
    DEFAULT_BATCH_SIZE,
    encode_requests,
    model_max_length,
    prefix_token,
    score_token_requests,
    tokenizer_adds_bos,
)

MODEL_NAME = "teal"
DEFAULT_MAX_GEN_TOKS = 256

logger = logging.getLogger(__name__)


def _as_bool(value: Any, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    if text in ("none", "auto", ""):
        return None
    raise ValueError(f"{name} must be true, false or auto; got {value!r}")


def _as_batch_size(value: Any) -> int:
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch_size must be >= 1 or 'auto', got {value!r}")
    return size


class TealLM(LM):
    """A (possibly sparsified) causal LM scored the lm-eval way; see the module docstring."""

    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        thresholds: str | None = None,
        sparsity: float = 0.0,
        method: str | None = None,
        prefill: str = "sparse",
        dense_prefix: int = 0,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        max_batch_size: int | None = None,  # accepted from lm-eval's CLI; unused
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        add_bos: bool | str | None = None,
        model: nn.Module | None = None,
        tokenizer: Any = None,
    ) -> None:
        import teal

        super().__init__()
        sparsity = teal.artifact.check_sparsity(sparsity or 0.0)  # a negative or NaN level must not run dense
        if model is None:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model, tokenizer = teal.load_model(str(pretrained), dtype=dtype, device=device)
        elif tokenizer is None:
            raise ValueError("TealLM(model=...) needs the model's tokenizer too")
        if thresholds:
            th = teal.Thresholds.load(str(thresholds), model=model)
            teal.sparsify_(
                model,
                th,
                sparsity=sparsity,
                method=method or None,
                prefill=str(prefill),
                dense_prefix=int(dense_prefix),
            )
        elif sparsity > 0:
            raise ValueError(
                f"sparsity={sparsity} needs thresholds=DIR (an artifact from `teal calibrate`)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = _as_batch_size(batch_size)
        self.max_length = int(max_length) if max_length else (model_max_length(model) or 2048)
        self.max_gen_toks = int(max_gen_toks)
        bos = _as_bool(add_bos, "add_bos")
        self.add_bos = tokenizer_adds_bos(tokenizer) if bos is None else bos
        self._device = next(model.parameters()).device

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any, **kwargs: Any) -> TealLM:
        """Wrap a model already loaded (and perhaps already sparsified)."""
        return cls(model=model, tokenizer=tokenizer, **kwargs)

    # -- lm-eval request types ----------------------------------------------------------------

    def loglikelihood(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        pairs = [tuple(req.args[:2]) for req in requests]
        encoded = encode_requests(self.tokenizer, pairs, add_bos=self.add_bos)
        results = score_token_requests(
            self.model,
            encoded,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=not disable_tqdm,
            desc="loglikelihood",
        )
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        self._log_sparsity()
        return results

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        prefix = prefix_token(self.tokenizer)
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        texts = [req.args[0] for req in requests]
        token_lists = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for i, tokens in enumerate(token_lists):
            for window in get_rolling_token_windows(
                token_list=list(tokens),
                prefix_token=prefix,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                ctx, cont = make_disjoint_window(window)
                windows.append((ctx, cont))
                owners.append(i)
        scores = score_token_requests(
            self.model,
            windows,
            batch_size=self.batch_size,
            max_length=self.max_length,
            progress=not disable_tqdm,
            desc="loglikelihood_rolling",
        )
        totals = [0.0] * len(texts)
        for owner, (ll, _) in zip(owners, scores):
            totals[owner] += ll
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        self._log_sparsity()
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            outputs.append(self._generate(context, gen_kwargs))
            self.cache_hook.add_partial("generate_until", req.args, outputs[-1])
        self._log_sparsity()
        return outputs

    # -- chat templates -----------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "teal")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- helpers ------------------------------------------------------------------------------

    def measured_sparsity(self) -> float:
        """Effective sparsity actually produced so far (0 for a dense model)."""
        from teal.sparsify import measured_sparsity

        try:
            value = measured_sparsity(self.model)
        except ValueError:  # an architecture teal cannot sparsify
            return 0.0
        return float(value) if not isinstance(value, dict) else 0.0

    def _log_sparsity(self) -> None:
        if getattr(self.model, "teal_sparsity", None) is not None:
            logger.info("teal: measured effective sparsity %.4f", self.measured_sparsity())

    def _generate(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        eos = getattr(self.tokenizer, "eos_token", None)
        if eos and eos not in until:
            until = [*until, eos]
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        if gen_kwargs.get("do_sample"):
            logger.warning("teal: do_sample is not supported; decoding greedily")
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        if self.add_bos:
            ids = [prefix_token(self.tokenizer, add_bos=True), *ids]
        ids = ids[-max(1, self.max_length - max_new) :]
        input_ids = torch.tensor([ids], device=self._device)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new,
                do_sample=False,
                stop_strings=list(until) or None,
                tokenizer=self.tokenizer,
                pad_token_id=pad if pad is not None else prefix_token(self.tokenizer),
            )
        text = self.tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=False)
        for stop in until:
            if stop and stop in text:
                text = text.split(stop, 1)[0]
        return text


def register() -> None:
    """Register :class:`TealLM` as lm-eval's ``teal`` model (done on import; idempotent)."""
    try:
        registered = get_model(MODEL_NAME)
    except (KeyError, ValueError):
        registered = None
    if registered is TealLM:
        return
    if registered is not None and registered.__qualname__ == TealLM.__qualname__:
        return  # this module imported twice under different names
    register_model(MODEL_NAME)(TealLM)


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line with ``--model teal`` available."""
    from lm_eval.__main__ import cli_evaluate

    register()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from teal.eval import lm_eval_adapter as _adapter

    _adapter.main()
else:
    register()


__all__ = ["TealLM", "main", "register"]
