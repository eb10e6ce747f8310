"""Summaries and plots of load-generator results."""

from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 99)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """p50/p90/p99 of `values` (seconds), in milliseconds by default; None when empty."""
    if not values:
        return {f"p{p}": None for p in PERCENTILES}
    points = np.percentile(np.asarray(values) * scale, PERCENTILES)
    return {f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, points, strict=True)}


def summarize(results, wall_s: float) -> dict:
    """Latency percentiles (ms), throughput and errors of one run."""
    ok = [r for r in results if r.error is None and r.num_tokens]
    ttft = [r.token_times[0] - r.start for r in ok]
    itl = [b - a for r in ok for a, b in zip(r.token_times, r.token_times[1:], strict=False)]
    e2e = [r.end - r.start for r in ok]
    num_output_tokens = sum(r.num_tokens for r in ok)
    errors = [r.error for r in results if r.error is not None]
    return {
        "num_requests": len(results),
        "num_errors": len(errors),
        "first_errors": errors[:3],
        "wall_s": round(wall_s, 3),
        "num_output_tokens": num_output_tokens,
        "num_prompt_tokens": sum(r.num_prompt_tokens for r in ok),
        "output_tok_s": round(num_output_tokens / wall_s, 2) if wall_s else 0.0,
        "requests_s": round(len(ok) / wall_s, 3) if wall_s else 0.0,
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e),
    }


def plot_results(runs: dict, path: Path) -> None:
    """One PNG: TTFT and ITL distributions (CDFs) and cumulative output tokens, per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_itl, ax_tokens) = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, results in runs.items():
        ok = [r for r in results if r.error is None and r.num_tokens]
        ttft = np.sort([(r.token_times[0] - r.start) * 1000 for r in ok])
        itl = np.sort(
            [
                (b - a) * 1000
                for r in ok
                for a, b in zip(r.token_times, r.token_times[1:], strict=False)
            ]
        )
        for ax, values in ((ax_ttft, ttft), (ax_itl, itl)):
            if len(values):
                ax.plot(values, np.linspace(0, 1, len(values)), label=name)
        times = np.sort([t for r in ok for t in r.token_times])
        ax_tokens.plot(times, np.arange(1, len(times) + 1), label=name)
    ax_ttft.set(title="Time to first token", xlabel="ms", ylabel="fraction of requests")
    ax_itl.set(title="Inter-token latency", xlabel="ms", ylabel="fraction of tokens")
    ax_tokens.set(title="Output tokens", xlabel="s since start", ylabel="tokens")
    for ax in (ax_ttft, ax_itl, ax_tokens):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
