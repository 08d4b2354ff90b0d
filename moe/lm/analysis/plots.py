"""The bundle's pictures: training curves and per-expert load (PNG bytes).

matplotlib's object-oriented API with the Agg canvas: no pyplot, no global
backend state, no display needed. Imported by `model.py` only, never on the
serving path.
"""

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def training_png(history: dict) -> bytes:
    """Loss and accuracy curves, training and validation, per epoch.

    Args:
        history: Keras `History.history` (`loss`, `val_loss`, `accuracy`,
            `val_accuracy`, `top5_accuracy`, `val_top5_accuracy`; missing
            keys are skipped).
    """
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for key, label in (("loss", "training"), ("val_loss", "validation")):
        _curve(loss_axes, history, key, label)
    loss_axes.set(title="Loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    for key, label in (
        ("accuracy", "top-1, training"),
        ("val_accuracy", "top-1, validation"),
        ("top5_accuracy", "top-5, training"),
        ("val_top5_accuracy", "top-5, validation"),
    ):
        _curve(accuracy_axes, history, key, label)
    accuracy_axes.set(
        title="Next-word accuracy", xlabel="epoch", ylabel="accuracy"
    )
    val_loss = history.get("val_loss")
    for axes in (loss_axes, accuracy_axes):
        if val_loss:  # the weights early stopping restores and saves
            best = 1 + min(range(len(val_loss)), key=val_loss.__getitem__)
            axes.axvline(best, color="gray", linestyle=":", label="saved")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend()
    return _png(figure)


def experts_png(history: dict[str, list], final: dict[str, list]) -> bytes:
    """Per-expert load over training and at the end, one row per layer.

    Args:
        history: `{layer: [[load per expert] per epoch, from epoch 0]}`
            (`ExpertLoadCallback.history`).
        final: `{layer: [load per expert]}` of the saved weights.
    """
    layers = list(history)
    figure = Figure(figsize=(10, 3.6 * len(layers)), layout="constrained")
    rows = figure.subplots(len(layers), 2, squeeze=False)
    for (over_time, at_end), layer in zip(rows, layers, strict=True):
        loads = history[layer]  # (epochs + 1, experts)
        experts = len(loads[0])
        epochs = range(len(loads))
        for expert in range(experts):
            over_time.plot(
                epochs,
                [load[expert] for load in loads],
                marker="o",
                markersize=3,
                label=f"expert {expert}",
            )
        balanced = 1 / experts
        over_time.axhline(balanced, color="gray", linestyle="--", lw=1)
        over_time.set(
            title=f"{layer}: load per expert during training",
            xlabel="epoch (0 = before training)",
            ylabel="fraction of routed pairs",
        )
        if experts <= 16:
            over_time.legend(fontsize="small", ncol=2)
        over_time.grid(alpha=0.3)
        load = final.get(layer, loads[-1])
        at_end.bar(range(experts), load, color="tab:blue")
        at_end.set_xticks(range(experts))
        at_end.axhline(
            balanced, color="gray", linestyle="--", lw=1, label="balanced"
        )
        at_end.set(
            title=f"{layer}: load of the saved weights",
            xlabel="expert",
            ylabel="fraction of routed pairs",
        )
        at_end.legend(fontsize="small")
        at_end.grid(alpha=0.3, axis="y")
    return _png(figure)


def expert_words_png(words: dict[str, list], top: int = 8) -> bytes:
    """Each expert's most frequent words, one row of panels per layer.

    Args:
        words: `training.json`'s `expert_words`
            (`moe.lm.analysis.expert_words.summarize`).
        top: the words shown per expert.
    """
    layers = list(words)
    columns = max(len(words[layer]) for layer in layers)
    figure = Figure(
        figsize=(2.3 * columns, 0.3 * top * len(layers) + 1.2),
        layout="constrained",
    )
    grid = figure.subplots(len(layers), columns, squeeze=False)
    for row, layer in zip(grid, layers, strict=True):
        for axes, info in zip(row, words[layer]):
            pairs = info["top_words"][:top][::-1]  # the most frequent on top
            axes.barh(
                range(len(pairs)), [p[2] for p in pairs], color="tab:blue"
            )
            axes.set_yticks(range(len(pairs)), [p[0] for p in pairs])
            axes.set_xlim(0, 1)
            axes.set_title(
                f"{layer} {info['expert']}: {info['load']:.0%} of load",
                fontsize="small",
            )
            axes.tick_params(labelsize="small")
            axes.grid(alpha=0.3, axis="x")
        for axes in row[len(words[layer]) :]:
            axes.set_visible(False)
    figure.supxlabel("share of the expert's words")
    return _png(figure)


def _curve(axes, history: dict, key: str, label: str) -> None:
    values = history.get(key)
    if values:
        axes.plot(range(1, len(values) + 1), values, marker="o", label=label)


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
