"""The one line `model.py` prints at the end of a training run, from
`train()`'s summary."""


def summary_line(summary: dict) -> str:
    """The one line `model.py` prints at the end."""
    val = summary["validation"]
    return (
        f"vocabulary {summary['vocab_size']} | pairs "
        f"{summary['pairs']['train']} train, "
        f"{summary['pairs']['validation']} validation | "
        f"{summary['epochs_run']} epochs in {summary['seconds']:.1f} s | "
        f"val top-1 {val['accuracy']:.3f}, top-5 {val['top5_accuracy']:.3f}, "
        f"perplexity {val['perplexity']:.1f}{_unknown(summary)} | "
        f"{_quantized_line(summary)}{_saved_where(summary)}"
    )


def _unknown(summary: dict) -> str:
    # The metrics count out-of-vocabulary targets (perplexity as a class).
    share = summary.get("out_of_vocabulary", {}).get("validation", 0)
    return f" ({share:.1%} of targets out of vocabulary)" if share else ""


def _quantized_line(summary: dict) -> str:
    if "quantized" not in summary:
        return ""
    q = summary["quantized"]
    return (
        f"{q['mode']}: top-1 {q['validation']['accuracy']:.3f}, "
        f"perplexity {q['validation']['perplexity']:.1f} | "
    )


def _saved_where(summary: dict) -> str:
    where = summary.get("distribution", {"chief": True})
    if where["chief"]:
        return f"saved to {summary['config']['output']}"
    return f"not saved by {where['task']}: the chief writes the bundle"
