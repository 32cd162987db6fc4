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
            extra = bench.get("extra_info") or {}
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
                # Device time (CUDA events, back-to-back calls), the kernels' own time
                # (profiler: no host time in it) and the minimal bytes, where recorded.
                **{key: extra.get(key) for key in ("device_ms", "kernel_ms", "min_bytes")},
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
    torch.compile; where a GPU run recorded them, the device time (CUDA events
    over back-to-back calls, without the per-call synchronisation in the
    median) and the kernels' own time (profiler, no host time: the figure
    to hold against the copy bandwidth when the host is the slower side),
    each with the GB/s it gives for the minimal bytes.
    """
    device_info = {(r["device"], r["file"], r["group"], r["case"], r["provider"]): r for r in rows}
    with_device = any(r.get("device_ms") for r in rows)
    with_kernels = any(r.get("kernel_ms") for r in rows)
    head = "| device | benchmark | case | provider | median | vs reference | vs torch.compile |"
    rule = "|---|---|---|---|---:|---:|---:|"
    if with_device:
        head += " device time | device GB/s |"
        rule += "---:|---:|"
    if with_kernels:
        head += " kernel time | kernel GB/s |"
        rule += "---:|---:|"
    lines = [head, rule]
    for (device, file, group, case), by in sorted(_cases(rows).items()):
        for provider, median in sorted(by.items()):
            ref, comp = by.get("reference"), by.get("torch_compile")
            line = (
                f"| {device} | {group} | {case} | {provider} | {median * 1e3:.3f} ms | "
                f"{f'{ref / median:.2f}x' if ref and median else '-'} | "
                f"{f'{comp / median:.2f}x' if comp and median else '-'} |"
            )
            info = device_info[(device, file, group, case, provider)]
            nbytes = info.get("min_bytes")
            for wanted, key in ((with_device, "device_ms"), (with_kernels, "kernel_ms")):
                if wanted:
                    ms = info.get(key)
                    gbs = f"{nbytes / ms / 1e6:.0f}" if ms and nbytes else "-"
                    line += f" {f'{ms:.3f} ms' if ms else '-'} | {gbs} |"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _label(group, case, provider):
    """A short bar label: group, the case's values not already in the group, provider."""
    values = []
    for key, value in re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", case):
        value = value.strip()
        if value not in group:
            values.append(value.strip("[]").replace(", ", "x"))
    group = group.replace("group_norm_silu", "GN-SiLU").replace("forward+backward", "fwd+bwd")
    group = group.replace("forward", "fwd").replace("channels_last", "CL")
    return f"{group} {' '.join(values)} [{provider}]"


# The providers that are this library's own (the rest are baselines).
OURS = ("fused", "fast")


def _latest_cases(rows):
    """_cases(rows) keeping, per (device, group, case), the newest file only
    (file names end in a sortable time stamp)."""
    latest = {}
    for (device, file, group, case), by in sorted(_cases(rows).items()):
        key = (device, group, case)
        if key not in latest or file > latest[key][0]:
            latest[key] = (file, by)
    return {key: by for key, (_, by) in sorted(latest.items())}


def render_chart(rows, path, width=900):
    """
    One row per case and per provider of this library's own (``OURS``), in
    a section per device, from the newest run of each case: bars on a log
    scale centred on 1x, for the speed-up over the reference (green, red
    when slower) and over torch.compile of the reference (blue, orange when
    slower) where that was measured.
    """
    import math

    from PIL import Image, ImageDraw

    sections = {}
    for (device, group, case), by in _latest_cases(rows).items():
        for provider in OURS:
            if provider not in by:
                continue
            ours, ref, comp = by[provider], by.get("reference"), by.get("torch_compile")
            if not ours:  # a zero median: no ratio to draw
                continue
            ratios = (ref / ours if ref else None, comp / ours if comp else None)
            if ratios != (None, None):
                sections.setdefault(device, []).append((_label(group, case, provider), ratios))
    row_h, head_h, top = 26, 26, 50
    n_rows = sum(len(v) for v in sections.values())
    height = top + head_h * len(sections) + row_h * max(n_rows, 1) + 10
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), "speed-up of iddpm_fast's ops, newest run per case (log scale; line = 1x)", fill="black")
    draw.text((10, 24), "upper bar: over the reference (reference.py, eager); lower bar: over torch.compile of it",
              fill="black")
    label_w = 390
    span = max([abs(math.log2(r)) for v in sections.values() for _, rs in v for r in rs if r] + [1.0])
    half = (width - label_w - 70) / 2
    per_unit = half / span
    centre = label_w + half + 10
    y = top
    for device, items in sections.items():
        draw.rectangle([0, y, width, y + head_h - 4], fill=(230, 230, 230))
        draw.text((8, y + 6), device, fill="black")
        for tick in range(-int(span), int(span) + 1):
            x = centre + tick * per_unit
            draw.text((x - 10, y + 6), f"{2.0 ** tick:g}x", fill=(90, 90, 90))
        y += head_h
        for label, (vs_ref, vs_comp) in items:
            draw.text((5, y + 7), label[:62], fill="black")
            for k, (ratio, good, bad) in enumerate(((vs_ref, (44, 160, 44), (214, 39, 40)),
                                                    (vs_comp, (31, 119, 180), (255, 127, 14)))):
                if not ratio:
                    continue
                x = centre + math.log2(ratio) * per_unit
                y0 = y + 3 + 11 * k
                draw.rectangle([min(centre, x), y0, max(centre, x), y0 + 9], fill=good if ratio >= 1 else bad)
                tx = x + 4 if ratio >= 1 else x - 44
                draw.text((tx, y0 - 1), f"{ratio:.2f}x", fill="black")
            y += row_h
    draw.line([centre, top, centre, height - 5], fill="black")
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
