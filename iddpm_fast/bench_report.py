"""
Render benchmark results (pytest-benchmark JSON files written by
``pytest bench/ --benchmark`` into bench/results/) as a markdown table and a
PNG chart of each case's speed-up over the reference, per device.
"""

import glob
import json
import os
import re

__all__ = ["load_results", "render_markdown", "render_chart", "report"]


def load_results(folder):
    """
    Every case of every JSON file in `folder`: a list of dicts with device,
    file, group, case (parameters other than the provider), provider, median_s.
    """
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} is not a pytest-benchmark JSON file: {exc}") from None
        device = (data.get("iddpm_fast") or {}).get("device") or data.get("machine_info", {}).get("node", "?")
        for bench in data.get("benchmarks", []):
            params = dict(bench.get("params") or {})
            provider = params.pop("provider", None)
            if provider is None:
                continue
            rows.append({
                "device": device,
                "file": os.path.basename(path),
                "group": bench.get("group") or bench["name"].split("[")[0],
                "case": ", ".join(f"{k}={v}" for k, v in sorted(params.items())),
                "provider": provider,
                "median_s": bench["stats"]["median"],
                # Device time (CUDA events, back-to-back calls) and the minimal bytes, where recorded.
                "device_ms": (bench.get("extra_info") or {}).get("device_ms"),
                "min_bytes": (bench.get("extra_info") or {}).get("min_bytes"),
            })
    return rows


def _cases(rows):
    cases = {}
    for r in rows:
        key = (r["device"], r["file"], r["group"], r["case"])
        cases.setdefault(key, {})[r["provider"]] = r["median_s"]
    return cases


def render_markdown(rows):
    """
    A markdown table: median per provider and its ratio to reference /
    torch.compile; where a GPU run recorded it, the device time (CUDA events
    over back-to-back calls, without the per-call synchronisation in the
    median) and the GB/s it gives for the minimal bytes.
    """
    device_info = {(r["device"], r["file"], r["group"], r["case"], r["provider"]): r for r in rows}
    with_device = any(r.get("device_ms") for r in rows)
    head = "| device | benchmark | case | provider | median | vs reference | vs torch.compile |"
    rule = "|---|---|---|---|---:|---:|---:|"
    if with_device:
        head += " device time | device GB/s |"
        rule += "---:|---:|"
    lines = [head, rule]
    for (device, file, group, case), by in sorted(_cases(rows).items()):
        for provider, median in sorted(by.items()):
            ref, comp = by.get("reference"), by.get("torch_compile")
            line = (
                f"| {device} | {group} | {case} | {provider} | {median * 1e3:.3f} ms | "
                f"{f'{ref / median:.2f}x' if ref else '-'} | {f'{comp / median:.2f}x' if comp else '-'} |"
            )
            if with_device:
                info = device_info[(device, file, group, case, provider)]
                ms, nbytes = info.get("device_ms"), info.get("min_bytes")
                line += f" {f'{ms:.3f} ms' if ms else '-'} | {f'{nbytes / ms / 1e6:.0f}' if ms and nbytes else '-'} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _label(device, group, case, provider):
    """A short bar label: device, group, the case's values not already in the group, provider."""
    values = []
    for key, value in re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", case):
        value = value.strip()
        if value not in group:
            values.append(value.strip("[]").replace(", ", "x"))
    group = group.replace("group_norm_silu", "GN-SiLU").replace("forward+backward", "fwd+bwd")
    group = group.replace("forward", "fwd").replace("channels_last", "CL")
    return f"{device[:12]} | {group} {' '.join(values)} [{provider}]"


def render_chart(rows, path, width=900):
    """Horizontal bars: speed-up over the reference of every non-reference provider."""
    from PIL import Image, ImageDraw

    bars = []
    for (device, _, group, case), by in sorted(_cases(rows).items()):
        ref = by.get("reference")
        for provider, median in sorted(by.items()):
            if ref and provider != "reference":
                bars.append((_label(device, group, case, provider), ref / median))
    height = 40 + 22 * max(len(bars), 1)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), "speed-up over the reference (same run); line = 1x", fill="black")
    label_w, top = 430, 30
    top_value = max([b[1] for b in bars] + [1.0]) * 1.1
    scale = (width - label_w - 60) / top_value
    for i, (label, ratio) in enumerate(bars):
        y = top + 22 * i
        draw.text((5, y + 4), label[:72], fill="black")
        colour = (44, 160, 44) if ratio >= 1 else (214, 39, 40)
        draw.rectangle([label_w, y + 3, label_w + ratio * scale, y + 17], fill=colour)
        draw.text((label_w + ratio * scale + 5, y + 4), f"{ratio:.2f}x", fill="black")
    draw.line([label_w + scale, top, label_w + scale, height - 5], fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def report(folder="bench/results"):
    """Write REPORT.md and speedups.png into `folder`; return (markdown, chart path)."""
    rows = load_results(folder)
    if not rows:
        raise FileNotFoundError(f"no benchmark results in {folder}; run `pytest bench/ --benchmark` first")
    md = render_markdown(rows)
    with open(os.path.join(folder, "REPORT.md"), "w") as f:
        f.write("# Benchmark results\n\nMedians per provider, measured in one run per file.\n\n" + md)
    return md, render_chart(rows, os.path.join(folder, "speedups.png"))
