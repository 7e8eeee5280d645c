"""Prints the op benchmark ratios from pytest-benchmark's JSON, and Triton's registers/spills.

    python benchmarks/report_ops.py benchmarks/results/ops.json
Appends the table to benchmarks/results/ops_history.md with the device and versions.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    machine = data.get("machine_info", {})
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][bench["extra_info"]["backend"]] = bench
    lines = [
        f"## {data.get('datetime', '')}: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', ''))}",
        "",
        "| op, shape | backend | median ms | vs reference | GB/s |",
        "|---|---|---|---|---|",
    ]
    for group, by_backend in sorted(groups.items()):
        # Exit heads against the reference op sequence; compaction against index_select of the same bytes.
        base = "reference" if "exit_head" in group else "index_select"
        ref = by_backend.get(base)
        for name, bench in sorted(by_backend.items()):
            median_ms = bench["stats"]["median"] * 1e3
            ratio = ref["stats"]["median"] / bench["stats"]["median"] if ref else float("nan")
            extra = bench["extra_info"]
            gbps = f"{extra['bytes'] / bench['stats']['median'] / 1e9:.2f}" if "bytes" in extra else "-"
            lines.append(f"| {group} | {name} | {median_ms:.3f} | {ratio:.2f}x vs {base} | {gbps} |")
    try:
        from fastbert_kernels.ops.triton_aot import compile_report

        lines += [
            "",
            "| Triton kernel (bf16 hidden) | sm | warps | registers | spill stores/loads (B) |",
            "|---|---|---|---|---|",
        ]
        for row in compile_report():
            if row["dtype"] == "bfloat16":
                lines.append(
                    f"| {row['kernel']} | {row['capability']} | {row['num_warps']} | {row['registers']} | "
                    f"{row['spill_stores']}/{row['spill_loads']} |"
                )
    except Exception as err:
        lines.append(f"\n(Triton AOT report unavailable: {err})")
    text = "\n".join(lines) + "\n"
    print(text)
    history = Path(path).with_name("ops_history.md")
    with history.open("a") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/ops.json"))
