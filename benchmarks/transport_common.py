"""What the transport-level scripts (``transport_throughput``, ``amqp_throughput``) share."""

from __future__ import annotations


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def plot(path: str, latency: dict[str, list[float]], consume: dict[str, float]) -> None:
    """Latency box plots beside consumer rates, written to ``path`` as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install 'cachesync[bench]' for the plot")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(latency)
    left.boxplot([[s * 1000 for s in latency[k]] for k in labels], showfliers=False)
    left.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
    left.set_ylabel("publish -> received (ms)")
    right.bar(list(consume), list(consume.values()))
    right.tick_params(axis="x", labelrotation=20, labelsize=8)
    right.set_ylabel("messages/s")
    fig.tight_layout()
    fig.savefig(path)
    print(f"\nplot written to {path}")
