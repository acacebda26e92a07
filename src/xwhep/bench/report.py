"""The outputs of a run: the printed table, ``latest.json``, ``latest.md`` and ``latest.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xwhep.bench import KEYS
from xwhep.bench.common import machine_line

#: key → (">=" or "<=", target, unit, label)
TARGETS: dict[str, tuple[str, float | None, str, str]] = {
    "throughput_sqlite_works_per_s": (">=", 5000, "works/s", "throughput, SQLite, largest M, end to end"),
    "throughput_postgres_works_per_s": (">=", None, "works/s", "throughput, PostgreSQL, largest M, end to end"),
    "dask_tasks_per_s": (">=", None, "tasks/s", "Dask distributed, LocalCluster 2 processes"),
    "ratio_vs_dask": (">=", 1.0, "×", "our SQLite throughput / Dask"),
    "dispatch_p50_ms": ("<=", 20, "ms", "dispatch to RUNNING, p50 (idle real worker)"),
    "dispatch_p99_ms": ("<=", None, "ms", "dispatch to RUNNING, p99"),
    "alive_hosts": (">=", 100_000, "hosts", "most hosts kept alive with p99 ≤ 100 ms, not saturated"),
    "alive_p99_ms": ("<=", 100, "ms", "alive latency p99 (from due time) at the largest N"),
    "upload_ratio_vs_raw": (">=", 0.9, "×", "upload vs raw TLS socket"),
    "download_ratio_vs_raw": (">=", 0.9, "×", "download vs raw TLS socket"),
    "relay_ratio_vs_ssh": (">=", 1.0, "×", "relay vs ssh -L"),
    "relay_connect_p50_ms": ("<=", 5, "ms", "connect latency the relay adds, p50"),
    "sandbox_overhead_ms": ("<=", 10, "ms", "native sandbox start over bare exec"),
    "observe_cost_pct": ("<=", 5, "%", "throughput cost of a live event stream + 1 scrape/s"),
    "vm_overhead_ratio": ("<=", 1.2, "×", "minimal VM job, start to result, over a bare QEMU boot"),
    "vm_job_start_s": ("<=", None, "s", "minimal VM job: QEMU start to the job's start"),
    "vm_bare_boot_s": ("<=", None, "s", "bare QEMU: same kernel + initramfs, boot and power-off"),
    "container_overhead_ratio": ("<=", 1.2, "×", "container job over podman run directly"),
    "debian_ssh_ready_s": ("<=", None, "s", "Debian cloud-init VM: QEMU start to sshd answering"),
}


def verdict(key: str, value: Any) -> str:
    op, target, _, _ = TARGETS.get(key, (">=", None, "", ""))
    if value is None:
        return "skipped"
    if target is None:
        return ""
    ok = value >= target if op == ">=" else value <= target
    return "ok" if ok else "MISS"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(key, value, target, verdict, note) for each headline key."""
    out = []
    for key in KEYS:
        value = doc.get(key)
        op, target, unit, label = TARGETS[key]
        tgt = f"{op} {_fmt(target)} {unit}".strip() if target is not None else ""
        note = doc.get("skipped", {}).get(key, "") if value is None else label
        out.append((key, f"{_fmt(value)} {unit}".strip() if value is not None else "—", tgt, verdict(key, value),
                    note))
    return out


def text_table(doc: dict[str, Any]) -> str:
    r = rows(doc)
    widths = [max(len(x[i]) for x in r) for i in range(4)]
    lines = [f"xwhep bench — {doc['date']} — {machine_line(doc['machine'])}" + (" — SMOKE" if doc.get("smoke") else "")]
    for row in r:
        lines.append("  ".join(row[i].ljust(widths[i]) for i in range(4)) + "  " + row[4][:90])
    lines += _load_lines(doc)
    return "\n".join(lines)


def _load_lines(doc: dict[str, Any]) -> list[str]:
    busy = {name: w.get("foreign_cpu_pct") for name, w in doc.get("load", {}).items()}
    busy = {k: v for k, v in busy.items() if v and v > 20}
    if not busy:
        return []
    return ["Machine shared during the run: other processes used " + ", ".join(
        f"{v:.0f}% of a core during {k}" for k, v in busy.items()) + " (numbers pessimistic)."]


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Run of {doc['date']} on {machine_line(doc['machine'])}"
             + (" (smoke sizes)" if doc.get("smoke") else "") + ".", "",
             "| metric | value | target | verdict | what / why skipped |", "|---|---:|---|---|---|"]
    for key, value, tgt, ver, note in rows(doc):
        lines.append(f"| `{key}` | {value} | {tgt} | {ver} | {note} |")
    load = _load_lines(doc)
    if load:
        lines += ["", *load]
    runs = doc.get("details", {}).get("throughput", {}).get("runs", [])
    if runs:
        lines += ["", "Throughput per run (works/s; latencies p50/p99 in ms; server CPU in % of one core):", "",
                  "| db | M | end to end | submit | dispatch | report | calls: count, p50 / p99 | server CPU "
                  "| server CPU ms/work |", "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in runs:
            if "error" in r:
                lines.append(f"| {r.get('db')} | {r.get('workers')} | error: {r['error'][:80]} ||||||")
                continue
            calls = "; ".join(f"{name} {v['calls']:,}, {_fmt(v['p50_ms'])} / {_fmt(v['p99_ms'])}"
                              for name, v in r.get("latency", {}).items()) or "—"
            lines.append(f"| {r['db']} | {r['workers']:,} | {_fmt(r['end_to_end_works_per_s'])} | "
                         f"{_fmt(r['submit_works_per_s'])} | {_fmt(r['dispatch_works_per_s'])} | "
                         f"{_fmt(r['report_works_per_s'])} | {calls} | "
                         f"{_fmt(r['server']['cpu_mean_pct'])} | {_fmt(r['server_cpu_ms_per_work'])} |")
    scale = doc.get("details", {}).get("scale", {}).get("runs", [])
    if scale:
        lines += ["", "Alive scale per run:", "",
                  "| hosts | registration | offered | achieved | p50 / p99 from due | service p50 / p99 | server CPU "
                  "| server RSS |", "|---:|---|---:|---:|---|---|---:|---:|"]
        for r in scale:
            if "error" in r:
                lines.append(f"| {r['hosts']:,} | error: {r['error'][:80]} |||||||")
                continue
            lines.append(f"| {r['hosts']:,} | {_fmt(r['registration_s'])} s ({_fmt(r['registrations_per_s'])}/s) | "
                         f"{_fmt(r['offered_per_s'])}/s | {_fmt(r['achieved_per_s'])}/s"
                         f"{' (saturated)' if r.get('saturated') else ''} | "
                         f"{_fmt(r['p50_ms'])} / {_fmt(r['p99_ms'])} ms | "
                         f"{_fmt(r['service_p50_ms'])} / {_fmt(r['service_p99_ms'])} ms | "
                         f"{_fmt(r['server']['cpu_mean_pct'])} % | {_fmt(r['server']['rss_max_mb'])} MB |")
    tr = doc.get("details", {}).get("transfer", {})
    if tr.get("xw_upload_mib_per_s"):
        lines += ["", f"Transfer of {tr['size_mib']} MiB (MiB/s, best of {tr['repeat']}; TLS {tr.get('tls')}): "
                      f"upload {_fmt(tr['xw_upload_mib_per_s'])} vs raw {_fmt(tr['raw_upload_mib_per_s'])} "
                      f"(raw + sha256: {_fmt(tr['raw_upload_sha256_mib_per_s'])}); download "
                      f"{_fmt(tr['xw_download_mib_per_s'])} vs raw {_fmt(tr['raw_download_mib_per_s'])}."]
    return "\n".join(lines) + "\n"


def write_json(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "latest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def plot(doc: dict[str, Any], path: Path) -> Path:
    """One PNG, six panels, titled with the date and the machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    fig.suptitle(f"xwhep bench — {doc['date']}{' (smoke)' if doc.get('smoke') else ''}\n"
                 f"{machine_line(doc['machine'])}", fontsize=11)
    details = doc.get("details", {})

    def skipped(ax: Any, title: str, keys: list[str]) -> None:
        ax.set_title(title)
        reason = next((doc.get("skipped", {}).get(k) for k in keys if doc.get("skipped", {}).get(k)), "no data")
        ax.text(0.5, 0.5, "skipped:\n" + _wrap(reason), ha="center", va="center", fontsize=9, transform=ax.transAxes)
        ax.set_axis_off()

    # 1. throughput per db and M, with Dask
    ax = axes[0][0]
    runs = [r for r in details.get("throughput", {}).get("runs", []) if "error" not in r]
    if runs:
        labels = [f"{r['db']}\nM={r['workers']}" for r in runs]
        vals = [r["end_to_end_works_per_s"] or 0 for r in runs]
        colors = ["tab:blue" if r["db"] == "sqlite" else "tab:green" for r in runs]
        dask = doc.get("dask_tasks_per_s")
        if dask:
            labels.append("Dask\n2 procs")
            vals.append(dask)
            colors.append("tab:orange")
        ax.bar(labels, vals, color=colors)
        ax.axhline(5000, color="red", ls="--", lw=1, label="target 5,000/s")
        ax.set_ylabel("works/s end to end")
        ax.set_title(f"1. throughput: {runs[0]['works']:,} no-op works")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    else:
        skipped(ax, "1. throughput", ["throughput_sqlite_works_per_s"])

    # 2. per stage for each run
    ax = axes[0][1]
    if runs:
        stages = ["submit_works_per_s", "dispatch_works_per_s", "report_works_per_s", "end_to_end_works_per_s"]
        width = 0.8 / len(stages)
        for j, st in enumerate(stages):
            ax.bar([i + j * width for i in range(len(runs))], [r.get(st) or 0 for r in runs], width,
                   label=st.replace("_works_per_s", "").replace("_", " "))
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(runs))],
                      [f"{r['db']}\nM={r['workers']}" for r in runs], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("works/s (log)")
        ax.set_title("1. throughput per stage")
        ax.legend(fontsize=8)
    else:
        skipped(ax, "1. throughput per stage", ["throughput_sqlite_works_per_s"])

    # 3. dispatch latency
    ax = axes[0][2]
    d = details.get("dispatch", {})
    if doc.get("dispatch_p50_ms") is not None:
        names = ["RUNNING p50", "RUNNING p99", "COMPLETED p50", "COMPLETED p99"]
        vals = [d.get("running_p50_ms"), d.get("running_p99_ms"), d.get("completed_p50_ms"), d.get("completed_p99_ms")]
        ax.bar(names, [v or 0 for v in vals], color="tab:purple")
        ax.axhline(20, color="red", ls="--", lw=1, label="target p50 20 ms")
        ax.set_ylabel("ms after submission")
        ax.set_title(f"2. dispatch latency ({d.get('works')} works, real worker)")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
    else:
        skipped(ax, "2. dispatch latency", ["dispatch_p50_ms"])

    # 4. alive scale
    ax = axes[1][0]
    sruns = [r for r in details.get("scale", {}).get("runs", []) if "error" not in r and r.get("alives")]
    if sruns:
        labels = [f"{r['hosts']:,} hosts\n{r['offered_per_s']:,.0f}/s offered" for r in sruns]
        ax.bar([i - 0.2 for i in range(len(sruns))], [r["p99_ms"] for r in sruns], 0.4, label="p99 from due (ms)")
        ax.bar([i + 0.2 for i in range(len(sruns))], [r["service_p99_ms"] for r in sruns], 0.4,
               label="p99 service (ms)")
        ax.axhline(100, color="red", ls="--", lw=1, label="target 100 ms")
        ax.set_yscale("log")
        ax.set_ylim(bottom=1, top=max(200.0, 3 * max(r["p99_ms"] for r in sruns)))
        ax.set_xticks(range(len(sruns)), labels, fontsize=8)
        for i, r in enumerate(sruns):
            ax.annotate(f"CPU {r['server']['cpu_mean_pct']}%\nRSS {r['server']['rss_max_mb']:.0f} MB\n"
                        f"{r['achieved_per_s']:,.0f}/s done", (i, r["p99_ms"]), fontsize=7, ha="center",
                        va="bottom")
        ax.set_title(f"3. alive scale (period {sruns[0]['alive_period_s']} s)")
        ax.legend(fontsize=8)
    else:
        skipped(ax, "3. alive scale", ["alive_p99_ms"])

    # 5. transfer
    ax = axes[1][1]
    tr = details.get("transfer", {})
    if tr.get("xw_upload_mib_per_s"):
        xs = [0, 1]
        ax.bar([x - 0.2 for x in xs], [tr["xw_upload_mib_per_s"], tr["xw_download_mib_per_s"]], 0.4, label="xwhep")
        ax.bar([x + 0.2 for x in xs], [tr["raw_upload_mib_per_s"], tr["raw_download_mib_per_s"]], 0.4,
               label="raw TLS socket")
        ax.set_xticks(xs, [f"upload ({doc.get('upload_ratio_vs_raw')}×)",
                           f"download ({doc.get('download_ratio_vs_raw')}×)"])
        ax.set_ylabel("MiB/s")
        ax.set_title(f"4. transfer of {tr['size_mib']:,} MiB")
        ax.legend(fontsize=8)
    else:
        skipped(ax, "4. transfer", ["upload_ratio_vs_raw"])

    # 6. relay and sandbox
    ax = axes[1][2]
    if doc.get("sandbox_overhead_ms") is not None:
        ax.bar(["sandbox start\noverhead"], [doc["sandbox_overhead_ms"]], 0.4, color="tab:brown")
        ax.set_xlim(-1, 1)
        ax.axhline(10, color="red", ls="--", lw=1, label="target 10 ms")
        ax.set_ylabel("ms over a bare exec")
        relay = doc.get("skipped", {}).get("relay_ratio_vs_ssh")
        ax.set_title("6. sandbox" + (" (5. relay skipped)" if relay else ""))
        ax.legend(fontsize=8)
        if relay:
            ax.set_xlabel("5. relay skipped: " + relay, fontsize=7)
        elif doc.get("relay_ratio_vs_ssh") is not None:
            ax.set_xlabel(f"5. relay: {doc['relay_ratio_vs_ssh']}× the throughput of ssh -L (target ≥ 1), "
                          f"+{doc.get('relay_connect_p50_ms')} ms connect p50", fontsize=8)
    else:
        skipped(ax, "5. relay / 6. sandbox", ["sandbox_overhead_ms", "relay_ratio_vs_ssh"])

    fig.text(0.99, 0.005, f"{doc['date']} · {doc['machine'].get('host', '')}", ha="right", fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.01, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 50) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)[:6])
