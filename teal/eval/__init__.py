"""Quality evaluation: perplexity and offline downstream tasks."""

from teal.eval.perplexity import method_label, perplexity, perplexity_sweep, wikitext2_perplexity

__all__ = ["method_label", "perplexity", "perplexity_sweep", "run_tasks", "wikitext2_perplexity"]


def __getattr__(name: str):
    if name == "run_tasks":
        from teal.eval.tasks import run_tasks

        return run_tasks
    raise AttributeError(name)
