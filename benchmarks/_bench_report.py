"""Tables for ``bench.py``: per-case results, unetkit-vs-peer ratios, goals, profiles."""

from __future__ import annotations

GROUPS = {
    "unet": dict(peer="BasicUNet", unit="img/s"),
    "attention_unet": dict(peer="AttentionUnet", unit="img/s"),
    "vnet": dict(peer="VNet", unit="vol/s"),
    "tiling": dict(peer="sliding_window_inference", unit="MP/s"),
    "tiling3d": dict(peer="sliding_window_inference", unit="MVox/s"),
    "diffusion": dict(peer="diffusers", unit="samples/s"),
}
PEAK_OF = {"fp32": "fp32_conv", "bf16": "bf16_conv"}


def _peaks(results: list[dict]) -> dict:
    for r in results:
        if r["group"] == "peaks" and r["status"] == "ok":
            return r
    return {}


def gflops(r: dict) -> float | None:
    if r.get("status") != "ok" or not r.get("flops"):
        return None
    return r["flops"] / r["median"] / 1e9


def _find(results: list[dict], **match) -> dict | None:
    for r in results:
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _best(results: list[dict], **match) -> dict | None:
    """The fastest ok result matching (a peer measured in several bf16 variants)."""
    found = [r for r in results if r.get("status") == "ok"
             and all(r.get(k) == v for k, v in match.items())]  # fmt: skip
    return min(found, key=lambda r: r["median"], default=None)


def _fast(results: list[dict]) -> str:
    """The fast-path precision used in this run (bf16 on native-bf16 CPUs)."""
    return "bf16" if _find(results, lib="unetkit", precision="bf16") else "fp32"


def comparisons(results: list[dict]) -> list[dict]:
    """(ours, peer) pairs: speed-up, FLOP-rate ratio (= speed-up at equal FLOPs), memory."""
    fast = _fast(results)
    rows = []

    def add(group: str, task: str, label: str, ours: dict | None, peer: dict | None) -> None:
        if ours is None or peer is None:
            return
        row = dict(group=group, task=task, label=label, speedup=peer["median"] / ours["median"])
        row["speedup_min"] = peer["min"] / ours["min"]  # steadier under concurrent load
        g_ours, g_peer = gflops(ours), gflops(peer)
        row["flop_ratio"] = g_ours / g_peer if g_ours and g_peer else None
        if ours.get("peak_mib") and peer.get("peak_mib"):
            row["memory_ratio"] = ours["peak_mib"] / peer["peak_mib"]
        rows.append(row)

    for group in ("unet", "attention_unet", "vnet"):
        for task in ("forward", "train"):
            k = dict(group=group, task=task)
            mine = {p: _find(results, lib="unetkit", precision=p, **k) for p in ("fp32", fast)}
            peer = {p: _find(results, lib="monai", precision=p, **k) for p in ("fp32", "bf16")}
            add(group, task, "fp32 vs MONAI fp32", mine["fp32"], peer["fp32"])
            add(group, task, "fast path vs MONAI default (fp32)", mine[fast], peer["fp32"])
            add(group, task, "fast path vs MONAI same bf16+CL", mine[fast], peer["bf16"])
    for group in ("tiling", "tiling3d"):
        k = dict(group=group)
        best = _find(results, lib="unetkit", precision=fast, variant="banded", **k)
        m32 = _find(results, lib="monai", precision="fp32", **k)
        add(group, "predict", "fast path + banded argmax vs MONAI default", best, m32)
        m16 = _find(results, lib="monai", precision="bf16", **k)
        add(group, "predict", "fast path + banded argmax vs MONAI bf16+CL", best, m16)
        plain = _find(results, lib="unetkit", precision="fp32", variant="plain", **k)
        add(group, "predict", "fp32 plain vs MONAI fp32", plain, m32)
        banded = _find(results, lib="unetkit", precision="fp32", variant="banded", **k)
        add(group, "predict", "fp32 banded argmax vs MONAI fp32", banded, m32)
    k = dict(group="diffusion")
    for p in ("fp32", "bf16"):
        ours, peer = _find(results, lib="unetkit", precision=p, **k), None
        peer = _best(results, lib="diffusers", precision=p, **k)
        add(
            "diffusion",
            "step",
            f"{p} vs diffusers {p}" + (" (faster variant)" if p == "bf16" else ""),
            ours,
            peer,
        )
    add(
        "diffusion",
        "step",
        "fast path vs diffusers default (fp32)",
        _find(results, lib="unetkit", precision=fast, **k),
        _find(results, lib="diffusers", precision="fp32", **k),
    )
    return rows


def goals(results: list[dict]) -> list[dict]:
    """The issue's targets, each with the measured value and pass / FAIL / n/a."""
    comp = {(c["group"], c["task"], c["label"]): c for c in comparisons(results)}
    peaks = _peaks(results)
    fast = _fast(results)
    out = []

    def goal(text: str, value: float | None, target: float, lower_is_better: bool = False):
        ok = None if value is None else (value <= target if lower_is_better else value >= target)
        status = "n/a" if ok is None else ("pass" if ok else "FAIL")
        out.append(dict(goal=text, value=value, target=target, status=status))

    def get(group: str, task: str, label: str, key: str) -> float | None:
        return comp.get((group, task, label), {}).get(key)

    default = "fast path vs MONAI default (fp32)"
    goal("U-Net train step vs MONAI BasicUNet, equal FLOPs (x)",
         get("unet", "train", default, "flop_ratio"), 2.5)  # fmt: skip
    goal("U-Net inference vs MONAI BasicUNet, equal FLOPs (x)",
         get("unet", "forward", default, "flop_ratio"), 3.0)  # fmt: skip
    fwd = _find(results, group="unet", task="forward", lib="unetkit", precision=fast)
    frac = gflops(fwd) / peaks[PEAK_OF[fast]] if fwd and peaks and gflops(fwd) else None
    goal("U-Net forward, fraction of measured conv peak", frac, 0.85)
    label = "fast path + banded argmax vs MONAI default"
    goal("Tiled 4096² speed-up vs MONAI sliding_window_inference (x)",
         get("tiling", "predict", label, "speedup"), 2.0)  # fmt: skip
    goal("Tiled 4096² peak memory / MONAI's",
         get("tiling", "predict", label, "memory_ratio"), 0.5, lower_is_better=True)  # fmt: skip
    same = [get("diffusion", "step", label, "speedup") for label in (
        "fp32 vs diffusers fp32", "bf16 vs diffusers bf16 (faster variant)")]  # fmt: skip
    same = [v for v in same if v is not None]
    goal("Diffusion step vs diffusers, same precision (worst of fp32/bf16) (x)",
         min(same) if same else None, 1.3)  # fmt: skip
    label = "fast path vs diffusers default (fp32)"
    goal("Diffusion step vs diffusers default fp32 (x)",
         get("diffusion", "step", label, "speedup"), 2.0)  # fmt: skip
    return out


def _f(value: float | None, fmt: str = "{:.3g}") -> str:
    return "" if value is None else fmt.format(value)


def render(meta: dict, results: list[dict]) -> str:
    """The whole report as Markdown."""
    peaks = _peaks(results)
    lines = [
        "# unetkit benchmark",
        "",
        f"`{meta['command']}` — {meta['date']}; {meta['cpu']}, {meta['cores']} cores, "
        f"{meta['threads']} torch threads; torch {meta['torch']}, Python {meta['python']}; "
        f"allocator: {meta['allocator']} (all cases); unetkit fast path: {meta['fast_path']}.",
        "",
    ]
    if peaks:
        lines += [
            f"Measured peaks: fp32 conv {peaks['fp32_conv']:.0f} GFLOP/s, bf16 channels-last "
            f"conv {peaks['bf16_conv']:.0f} GFLOP/s, bf16 matmul {peaks['bf16_matmul']:.0f} "
            "GFLOP/s.",
            "",
        ]
    lines += [
        "| group | task | library | model | precision | median s | min s | max s | "
        "throughput | GFLOP | GFLOP/s | % peak | peak MiB | note |",
        "|" + "---|" * 14,
    ]
    for r in results:
        if r["group"] == "peaks":
            continue
        unit = GROUPS.get(r["group"], {}).get("unit", "")
        precision = r.get("precision", "")
        label = precision + ("+CL" if precision == "bf16" else "")
        if r.get("variant"):
            label += f" {r['variant']}"
        cells = [r["group"], r.get("task", ""), r["lib"], r.get("model", ""), label]
        if r["status"] != "ok":
            cells += [""] * 8 + [f"{r['status']}: {r.get('note', '')}"]
        else:
            g = gflops(r)
            peak = peaks.get(PEAK_OF.get(precision, ""))
            cells += [
                _f(r["median"]),
                _f(r["min"]),
                _f(r["max"]),
                f"{r['items'] / r['median']:.3g} {unit}",
                _f(r.get("flops", 0) / 1e9),
                _f(g),
                _f(100 * g / peak if g and peak else None, "{:.0f}%"),
                _f(r.get("peak_mib"), "{:.0f}"),
                f"{r.get('windows', '')} windows" if r.get("windows") else "",
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += [
        "",
        "## unetkit vs peers (ratios > 1: unetkit faster; memory < 1: unetkit smaller)",
        "",
        "| group | task | comparison | speed-up (median) | speed-up (min) | FLOP-rate ratio |"
        " peak-memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in comparisons(results):
        lines.append(
            f"| {c['group']} | {c['task']} | {c['label']} | {c['speedup']:.2f}x | "
            f"{c['speedup_min']:.2f}x | {_f(c['flop_ratio'], '{:.2f}x')} | "
            f"{_f(c.get('memory_ratio'), '{:.2f}')} |"
        )
    lines += ["", "## Goals", "", "| goal | measured | target | status |", "|---|---|---|---|"]
    for g in goals(results):
        lines.append(
            f"| {g['goal']} | {_f(g['value'], '{:.2f}')} | {g['target']} | {g['status']} |"
        )
    profiled = [r for r in results if r.get("profile")]
    if profiled:
        lines += ["", "## Where the time goes (torch.profiler, one call, self CPU time)", ""]
    for r in profiled:
        lines += [
            f"**{r['group']} {r['task']} {r['lib']} {r['precision']}**",
            "",
            "| op | ms | % |",
            "|---|---|---|",
        ]
        lines += [f"| `{name}` | {ms:.1f} | {pct:.1f} |" for name, ms, pct in r["profile"]]
        lines.append("")
    return "\n".join(lines) + "\n"
