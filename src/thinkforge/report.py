"""Report: plots (PNG) and a Markdown page from a run's ``results.json`` and its stages' ``metrics.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

from thinkforge.evaluate import format_rows


def _loss_curves(stages: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for stage, run in stages.items():
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        tokens, seen = [], 0
        for r in rows:
            seen += r["seen_tokens"]
            tokens.append(seen)
        ax.plot(tokens, [r["loss"] for r in rows], label=stage)
    ax.set_xlabel("training tokens processed (compute)")
    ax.set_ylabel("loss per completion token")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _accuracy_bars(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["metric"] in ("pass@1", "accuracy") and "family" not in r]
    labels = [f"{r['stage']}\n{r['method']}" for r in shown]
    values = [r["value"] * 100 for r in shown]
    err = [[(r["value"] - r["ci_low"]) * 100 for r in shown], [(r["ci_high"] - r["value"]) * 100 for r in shown]]
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(shown)), 3.5))
    colours = {"sft-direct": "#999", "sft-cot": "#3a7", "grpo": "#37a"}
    ax.bar(range(len(shown)), values, yerr=err, capsize=4, color=[colours.get(r["stage"], "#a73") for r in shown])
    ax.set_xticks(range(len(shown)), labels, fontsize=8)
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_ylim(0, 100)
    ax.set_title("accuracy with 95% bootstrap intervals")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _rl_curves(run: Path, out: Path) -> None:
    """Reward, accuracy and completion length per GRPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in rows]

    def curve(ax, key: str, label: str) -> None:  # raw values faint, a 10-step moving average on top
        raw = [r[key] for r in rows]
        smooth = [sum(raw[max(0, i - 9) : i + 1]) / len(raw[max(0, i - 9) : i + 1]) for i in range(len(raw))]
        line = ax.plot(steps, smooth, label=label)[0]
        ax.plot(steps, raw, color=line.get_color(), alpha=0.25, linewidth=0.8)

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.3))
    curve(a, "reward", "reward")
    curve(a, "accuracy", "accuracy (all sampled groups)")
    a.set_xlabel("GRPO step")
    a.legend(fontsize=8)
    curve(b, "completions/mean_length", "completion")
    curve(b, "thinking_length", "thinking")
    b.set_xlabel("GRPO step")
    b.set_ylabel("tokens")
    b.legend(fontsize=8)
    fig.suptitle("GRPO: reward and response length")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def compute_curves(rows: list[dict], out: Path, title: str = "accuracy vs inference compute") -> Path:
    """Accuracy (95% CI bars) against policy tokens per problem, one line per test-time method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[dict]] = {}
    for r in rows:
        if "family" in r:
            families.setdefault(r["family"], []).append(r)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r["tokens"])
        x, y = [r["tokens"] for r in rs], [r["value"] * 100 for r in rs]
        err = [[(r["value"] - r["ci_low"]) * 100 for r in rs], [(r["ci_high"] - r["value"]) * 100 for r in rs]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=fam)
        for r, xi, yi in zip(rs, x, y):
            ax.annotate(str(r["compute"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("policy tokens generated per problem (log scale); labels: n")
    ax.set_ylabel("accuracy on held-out problems (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(out_dir: Path, results: dict, stages: dict[str, Path], rl_run: Path | None = None) -> Path:
    """Write ``loss.png``, ``accuracy.png`` (and ``rl.png``) and ``report.md`` into ``out_dir``."""
    _loss_curves(stages, out_dir / "loss.png")
    has_rl = rl_run is not None and (rl_run / "metrics.jsonl").exists()
    if has_rl:
        _rl_curves(rl_run, out_dir / "rl.png")
    _accuracy_bars(results["rows"], out_dir / "accuracy.png")
    lines = [
        f"# thinkforge demo — {results['task']}",
        "",
        results.get("summary", ""),
        "",
        "```",
        format_rows(results["rows"]),
        "```",
        "",
    ]
    for c in results.get("comparisons", []):
        lines.append(f"- {c['b']} vs {c['a']} ({c['metric']}): {c['diff'] * 100:+.1f} points, "
                     f"95% CI [{c['ci_low'] * 100:+.1f}, {c['ci_high'] * 100:+.1f}], paired bootstrap p = {c['p_value']:.3f}")
    lines += ["", "| stage | training steps | supervised tokens | tokens processed | seconds |", "|---|---|---|---|---|"]
    for stage, t in results.get("train", {}).items():
        lines.append(f"| {stage} | {t['steps']} | {t['supervised_tokens']} | {t['seen_tokens']} | {t['seconds']:.0f} |")
    lines += ["", "![training loss](loss.png)", "", "![accuracy](accuracy.png)", ""]
    if has_rl:
        lines += ["![GRPO reward and length](rl.png)", ""]
    if any("family" in r for r in results["rows"]):
        compute_curves(results["rows"], out_dir / "compute.png", "test-time compute on the final model")
        lines += ["## Test-time compute", ""]
        ev = results.get("prm_eval")
        if ev:
            st, rk = ev["step"], ev["ranking"]["min"]
            lines += [f"PRM (gold step labels) on {ev['completions']} completions of held-out problems: wrong-step "
                      f"precision {st['precision']:.3f}, recall {st['recall']:.3f}, F1 {st['f1']:.3f} over "
                      f"{st['steps']} steps; it ranks a right completion above a wrong one of the same problem in "
                      f"{rk['accuracy'] * 100:.1f}% of {rk['pairs']} pairs (min aggregation).", ""]
        lines += ["![accuracy vs tokens](compute.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
