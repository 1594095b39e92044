"""The final loss-per-head plot, saved as an artifact."""

from __future__ import annotations

from pathlib import Path


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing): train losses
    of small batches are noisy enough that raw curves of n heads hide one another."""
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**k))
    return out


def plot_head_losses(history: list[dict], val_history: list[dict], out: Path) -> Path:
    """history: [{'step': s, 'head_losses': [...]}, ...] -> PNG, one colour per head: the raw
    train curve faint, its moving average solid, validation points dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(history[0]["head_losses"]) if history else 0
    steps = [h["step"] for h in history]
    for i in range(n):
        raw = [h["head_losses"][i] for h in history]
        line = ax.plot(steps, smooth(raw), label=f"head {i + 1} (t+{i + 1})", linewidth=1.6)
        colour = line[0].get_color()
        ax.plot(steps, raw, color=colour, alpha=0.2, linewidth=0.8)
        if val_history:
            ax.plot(
                [v["step"] for v in val_history],
                [v["head_losses"][i] for v in val_history],
                "o--",
                color=colour,
                markersize=3,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("Loss per head (train: raw faint, smoothed solid; validation: dashed)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
