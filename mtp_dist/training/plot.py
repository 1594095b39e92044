"""The final loss-per-head plot, saved as an artifact."""

from __future__ import annotations

from pathlib import Path


def plot_head_losses(history: list[dict], val_history: list[dict], out: Path) -> Path:
    """history: [{'step': s, 'head_losses': [...]}, ...] -> PNG with one curve per head."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(history[0]["head_losses"]) if history else 0
    for i in range(n):
        steps = [h["step"] for h in history]
        line = ax.plot(
            steps, [h["head_losses"][i] for h in history], label=f"head {i + 1} (t+{i + 1})"
        )
        if val_history:
            ax.plot(
                [v["step"] for v in val_history],
                [v["head_losses"][i] for v in val_history],
                "o--",
                color=line[0].get_color(),
                markersize=3,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title("Loss per head (solid: train, dashed: validation)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
