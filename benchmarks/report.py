"""Results (JSON lines) -> the generated tables of README.md and docs/performance.md, and the
figures in docs/img/benchmarks/*.png.

    python benchmarks/run.py report [--results FILE.jsonl] [--page FILE.md ...] [--check]

Each table lives in one of the pages (default: PAGES) between `<!-- perf:NAME:begin -->` and
`<!-- perf:NAME:end -->`. NAME is a key of BLOCKS: one per case in RESULT_TABLES (a table of that case's
records), `scaling` (the analytic table of benchmarks/scaling_table.py) and `headline` (a few rows
for the README, picked by benchmarks/headline.py). To add a block, add its builder to BLOCKS and
its markers to a page. Of several records of one measurement -- same case, config, impl, dtype,
batch, shapes and device -- the latest wins, and a command rerun at a newer commit replaces all
rows of its earlier commits. Tables are grouped by device; each group names the device, the
versions and the commands that produced it. `--check` rewrites nothing and exits 1 when a page
differs from what the results give.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import re
import sys
from collections import defaultdict

from benchmarks.recorder import DEFAULT_RESULTS, REPO

PLOTS = REPO / "docs" / "img" / "benchmarks"
README = REPO / "README.md"
PAGES = (README, REPO / "docs" / "performance.md")  # the pages whose blocks `report` writes
# cases with a generated table: adding a case here (and, if wanted, its SHOWN_SHAPES / EXTRA_COLUMNS)
# is all it takes, given its `<!-- perf:CASE:begin/end -->` markers in a page (docs/performance.md
# already holds data_pipeline's)
RESULT_TABLES = ("train_step", "forward", "esm2", "input_pipeline", "attention", "data_pipeline", "store_lookup")
# shapes entries shown in a table's "sizes" column (None: all of them)
SHOWN_SHAPES = {"train_step": (), "forward": (), "esm2": ("length", "proteins"), "input_pipeline": ("windows",),
                "attention": ("genes", "heads", "head_dim", "pass"), "data_pipeline": ("format", "esm2"),
                "store_lookup": ("rows", "keys")}
# extra columns: (header, extra key, formatter)
EXTRA_COLUMNS = {
    "train_step": (("genes/s", "genes_per_s", "number"),),
    "esm2": (("residues/s", "residues_per_s", "number"), ("max abs diff (pooled)", "max_abs_diff_pooled_vs_torch",
                                                           "float")),
    "forward": (("max abs diff", "max_abs_diff_vs_torch", "float"),),
    "input_pipeline": (("genes/s", "genes_per_s", "number"), ("MB/s", "MB_per_s", "number")),
    "attention": (("peak memory", "memory", "bytes"),),
    "data_pipeline": (("peak RSS", "peak_rss_bytes", "bytes"), ("distinct proteins/s", "proteins_per_s", "number"),
                      ("windows/s", "windows_per_s", "number")),
    "store_lookup": (("warm get", "get_warm_s", "seconds"), ("peak RSS", "peak_rss_bytes", "bytes"),
                     ("on disk", "store_bytes", "bytes"), ("build", "build_s", "seconds")),
}
LENGTH_KEYS = ("genes", "seq_len", "length", "S", "contig_genes")  # contig length in attention records
MEMORY_KEYS = ("peak_memory_bytes", "memory_bytes", "compiled_bytes")  # the attention case's extra


class ResultsError(ValueError):
    """A results file that is not JSON lines of records."""


class ReadmeError(ValueError):
    """No page holds a block's markers."""


def marker(name: str, edge: str) -> str:
    return f"<!-- perf:{name}:{edge} -->"


def load_results(path: pathlib.Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ResultsError(f"{path}:{number}: not a JSON record ({error.msg})") from None
        if not isinstance(record, dict) or "case" not in record:
            raise ResultsError(f"{path}:{number}: a record needs a 'case' field")
        records.append(record)
    return records


def measurement_key(record: dict) -> tuple:
    return (record.get("case"), record.get("config"), record.get("impl"), record.get("dtype"), record.get("batch"),
            json.dumps(record.get("shapes") or {}, sort_keys=True), record.get("device"))


def newest_runs(records: list[dict]) -> list[dict]:
    """Drops the records of a command's earlier commits: when the same command (case, config,
    device) ran again at a newer commit, its old rows go even where the new run measured other
    shapes (e.g. new ESM2 bucket lengths), so a table never mixes two versions of one sweep."""
    def group(record):
        return record.get("case"), record.get("config"), record.get("device"), record.get("command")

    newest: dict[tuple, tuple] = {}
    for index, record in enumerate(records):
        rank = (record.get("timestamp") or "", index)
        if group(record) not in newest or rank >= newest[group(record)][0]:
            newest[group(record)] = (rank, record.get("commit"))
    return [record for record in records if record.get("commit") == newest[group(record)][1]]


def latest(records: list[dict]) -> list[dict]:
    """The latest record of each measurement (by timestamp, then file order) among `newest_runs`,
    in first-seen order."""
    chosen: dict[tuple, tuple] = {}
    for index, record in enumerate(newest_runs(records)):
        key = measurement_key(record)
        rank = (record.get("timestamp") or "", index)
        if key not in chosen or rank >= chosen[key][0]:
            chosen[key] = (rank, record)
    return [record for _, record in chosen.values()]


# --- formatting ---------------------------------------------------------------------------------

def fmt_number(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    value = float(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def fmt_seconds(value) -> str:
    if value is None:
        return ""
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def fmt_bytes(value) -> str:
    if value is None:
        return ""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_percent(value) -> str:
    return "" if value is None else f"{value:.1%}"


def fmt_float(value) -> str:
    return "" if value is None else f"{value:.2g}"


FORMATTERS = {"number": fmt_number, "bytes": fmt_bytes, "float": fmt_float, "seconds": fmt_seconds}


def memory_bytes(record: dict):
    """Peak memory of an attention record: a known extra key, else the first extra "*_bytes"."""
    extra = record.get("extra") or {}
    for key in MEMORY_KEYS + tuple(k for k in extra if k.endswith("_bytes")):
        if isinstance(extra.get(key), (int, float)):
            return extra[key]
    return None


def contig_length(record: dict):
    shapes = record.get("shapes") or {}
    return next((shapes[k] for k in LENGTH_KEYS if isinstance(shapes.get(k), (int, float))), None)


def sizes(case: str, record: dict) -> str:
    shown = SHOWN_SHAPES.get(case)
    shapes = record.get("shapes") or {}
    items = [(k, v) for k, v in shapes.items() if shown is None or k in shown]
    return ", ".join(f"{k}={v}" for k, v in items)


def baseline_cell(record: dict) -> str:
    if record.get("ratio_vs_baseline") is None:
        return ""
    return f"{record['ratio_vs_baseline']:.2f}x vs {str(record.get('baseline') or '?').split(' (')[0]}"


def sort_key(record: dict) -> tuple:
    def orderable(value):
        if value is None:
            return (2, 0, "")
        if isinstance(value, (int, float)):
            return (0, value, "")
        return (1, 0, str(value))
    shapes = record.get("shapes") or {}
    length = next((shapes[k] for k in LENGTH_KEYS if k in shapes), None)
    return (orderable(length), orderable(record.get("config")), orderable(record.get("batch")),
            tuple(orderable(shapes[k]) for k in sorted(shapes)), orderable(record.get("dtype")),
            orderable(record.get("impl")))


def row_cells(case: str, record: dict) -> dict:
    ok = record.get("status", "ok") == "ok"
    cells = {
        "config": str(record.get("config") or ""),
        "batch": "" if record.get("batch") is None else str(record["batch"]),
        "sizes": sizes(case, record),
        "impl": str(record.get("impl") or ""),
        "dtype": str(record.get("dtype") or ""),
        "time (median)": fmt_seconds(record.get("median_s")) if ok else
        f"{record.get('status')}: {str(record.get('reason') or '').replace('|', '/')[:80]}",
        "throughput": (f"{fmt_number(record['items_per_s'])} {record.get('items_unit') or ''}".strip()
                       if ok and record.get("items_per_s") else ""),
    }
    for header, key, kind in EXTRA_COLUMNS.get(case, ()):
        value = memory_bytes(record) if key == "memory" else (record.get("extra") or {}).get(key)
        cells[header] = FORMATTERS[kind](value) if ok and isinstance(value, (int, float)) else ""
    cells["vs baseline"] = baseline_cell(record) if ok else ""
    cells["MFU (measured matmul peak)"] = fmt_percent(record.get("mfu_measured_peak")) if ok else ""
    cells["MFU (bf16 data sheet)"] = fmt_percent(record.get("mfu_datasheet")) if ok else ""
    return cells


def device_caption(records: list[dict]) -> str:
    first = records[0]
    versions = first.get("versions") or {}
    shown = ", ".join(f"{name} {versions[name]}" for name in ("jax", "torch", "transformers") if versions.get(name))
    cpus = f", {first['cpu_count']} CPU threads" if first.get("cpu_count") else ""
    commits = sorted({(r.get("commit") or {}).get("sha", "")[:10] + ("+dirty" if (r.get("commit") or {}).get("dirty")
                                                                    else "") for r in records} - {""})
    commands = sorted({r.get("command") for r in records if r.get("command")})
    lines = [f"**{first.get('device')}** ({first.get('platform')}{cpus}; {shown}; "
             f"commit {', '.join(commits) or 'unknown'}). Reproduce: " + "; ".join(f"`{c}`" for c in commands)]
    return "\n".join(lines)


def markdown_table(case: str, records: list[dict]) -> str:
    rows = [row_cells(case, r) for r in sorted(records, key=sort_key)]
    headers = [h for h in rows[0] if any(row[h] for row in rows)]
    numeric = {"batch", "time (median)", "throughput", "vs baseline", "MFU (measured matmul peak)",
               "MFU (bf16 data sheet)"} | {h for h, _, _ in EXTRA_COLUMNS.get(case, ())}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if h in numeric else "---" for h in headers) + "|"]
    lines += ["| " + " | ".join(row[h] for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def by_device(records: list[dict]) -> dict[str, list[dict]]:
    groups = defaultdict(list)
    for record in records:
        groups[str(record.get("device"))].append(record)
    return dict(sorted(groups.items()))


def case_block(case: str, records: list[dict], page_dir: pathlib.Path = REPO,
               plots: pathlib.Path = PLOTS) -> str:
    """The `case` table of the latest `records`, one per device, with its figure linked relative
    to the page's folder `page_dir`."""
    mine = [r for r in records if r.get("case") == case]
    if not mine:
        return f"_No `{case}` measurements in the results yet: `python benchmarks/run.py {case}`._"
    parts = []
    for device, group in by_device(mine).items():
        parts += [device_caption(group), "", markdown_table(case, group), ""]
        for plot in plot_files(case, device, group, plots):
            parts += [f"![{case} on {device}]({os.path.relpath(plot, page_dir)})", ""]
    return "\n".join(parts).rstrip()


def scaling_block() -> str:
    from benchmarks import scaling_table

    return scaling_table.markdown()


def headline_block(records: list[dict]) -> str:
    """The README's few headline rows (benchmarks/headline.py)."""
    from benchmarks import headline

    return headline.block(records)


# name -> builder(latest records, page folder, plots folder) -> Markdown between the markers
BLOCKS = {
    **{case: functools.partial(case_block, case) for case in RESULT_TABLES},
    "scaling": lambda records, page_dir, plots: scaling_block(),
    "headline": lambda records, page_dir, plots: headline_block(records),
}


def blocks_in(text: str) -> list[str]:
    """The names of BLOCKS whose markers `text` holds."""
    return [name for name in BLOCKS if marker(name, "begin") in text and marker(name, "end") in text]


def render_page(text: str, contents: dict[str, str], where: str = "README.md") -> str:
    """`text` with each block between its markers replaced by `contents[name]`."""
    for name, content in contents.items():
        begin, end = marker(name, "begin"), marker(name, "end")
        if begin not in text or end not in text or text.index(begin) > text.index(end):
            raise ReadmeError(f"{where}: markers {begin} ... {end} not found")
        start, stop = text.index(begin) + len(begin), text.index(end)
        text = text[:start] + "\n" + content + "\n" + text[stop:]
    return text


render_readme = render_page  # the earlier name


def render_pages(pages: list[pathlib.Path], records: list[dict], plots: pathlib.Path = PLOTS) -> dict:
    """{page: (text now, text the results give)}; every block of BLOCKS must be in some page."""
    current = latest(records)
    texts = {page: page.read_text() for page in pages}
    missing = [name for name in BLOCKS if not any(name in blocks_in(text) for text in texts.values())]
    if missing:
        raise ReadmeError(f"markers {marker(missing[0], 'begin')} ... {marker(missing[0], 'end')} not found in "
                          f"{', '.join(str(p) for p in pages)}")
    return {page: (text, render_page(text, {name: BLOCKS[name](current, page.parent, plots)
                                            for name in blocks_in(text)}, str(page)))
            for page, text in texts.items()}


# --- plots --------------------------------------------------------------------------------------

def _ok(records):
    return [r for r in records if r.get("status", "ok") == "ok" and r.get("median_s")]


def plot_series(case: str, records: list[dict]) -> dict[str, list[tuple]]:
    """Lines to draw -> {label: [(x, y...), ...]} for the case's figure (empty: no figure). A
    label's words are implementation-ish first, then dtype, then (attention) the pass."""
    series = defaultdict(list)
    for r in _ok(records):
        if case == "train_step":
            mfu = r.get("mfu_datasheet") if r.get("mfu_datasheet") is not None else r.get("mfu_measured_peak")
            if isinstance(r.get("batch"), int) and mfu is not None:
                series[f"{r['config']}/{r['impl']} {r['dtype']}"].append((r["batch"], mfu))
        elif case == "attention":
            length = contig_length(r)
            if length is not None:
                # config may name the length itself: one line per implementation, dtype and pass
                label = " ".join(str(v) for v in (r.get("impl"), r.get("dtype"), (r.get("shapes") or {}).get("pass"))
                                 if v)
                series[label].append((length, r["median_s"], memory_bytes(r)))
        elif case == "data_pipeline":
            genes, rss = (r.get("shapes") or {}).get("genes"), (r.get("extra") or {}).get("peak_rss_bytes")
            if isinstance(genes, int) and rss:
                shapes = r.get("shapes") or {}  # one line per command (make-shards, infer), embedder and format
                series[f"{r.get('impl')} {shapes.get('esm2')} {shapes.get('format')}"].append((genes, rss / 2 ** 20))
        elif case == "esm2":
            length = (r.get("shapes") or {}).get("length")
            if isinstance(length, int) and r.get("items_per_s"):
                series[f"{r['config']}/{r['impl']} {r['dtype']}"].append((length, r["items_per_s"]))
    return {label: sorted(points) for label, points in sorted(series.items())}


def plot_files(case: str, device: str, records: list[dict], plots: pathlib.Path = PLOTS) -> list[pathlib.Path]:
    """The figure(s) `write_plots` draws for these records (none when there is nothing to plot)."""
    names = {"train_step": "mfu_vs_batch", "attention": "time_memory_vs_length", "esm2": "proteins_per_s_vs_length",
             "data_pipeline": "peak_rss_vs_genes"}
    if case not in names or not plot_series(case, records):
        return []
    return [plots / f"{case}_{names[case]}_{slug(device)}.png"]


def write_plots(records: list[dict], out_dir: pathlib.Path = PLOTS) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    current = latest(records)
    for case in ("train_step", "attention", "esm2", "data_pipeline"):
        for device, group in by_device([r for r in current if r.get("case") == case]).items():
            files = plot_files(case, device, group, out_dir)
            if not files:
                continue
            series = plot_series(case, group)
            panels = 2 if case == "attention" else 1
            fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2.5, 4.2), squeeze=False)
            axes = axes[0]
            # colour: the implementation; line: float32 solid, others dashed; marker: the pass
            colours = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(k.split()[0] for k in series))}
            for label, points in series.items():
                words = label.split()
                style = dict(color=colours[words[0]], linestyle="-" if "float32" in words else "--",
                             marker="s" if "forward_backward" in words else "o", label=label)
                xs = [p[0] for p in points]
                axes[0].plot(xs, [p[1] for p in points], **style)
                if case == "attention":
                    memory = [(x, p[2]) for x, p in zip(xs, points) if p[2] is not None]
                    if memory:
                        axes[1].plot(*zip(*memory), **style)
            if case == "train_step":
                mfu_kind = "bf16 data sheet" if any(r.get("mfu_datasheet") for r in group) else "measured matmul peak"
                axes[0].set(xlabel="batch (contigs)", ylabel=f"MFU (vs {mfu_kind})", xscale="log")
                axes[0].yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
            elif case == "data_pipeline":
                axes[0].set(xlabel="corpus (genes)", ylabel="peak RSS (MiB)", xscale="log", ylim=(0, None))
            elif case == "attention":
                axes[0].set(xlabel="contig length (genes)", ylabel="seconds (median)", xscale="log", yscale="log")
                axes[1].set(xlabel="contig length (genes)", ylabel="peak memory (bytes)", xscale="log", yscale="log")
            else:
                axes[0].set(xlabel="padded length (tokens)", ylabel="proteins / s", xscale="log", yscale="log")
            for ax in axes:
                ax.grid(True, alpha=0.3)
            axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
            commands = sorted({r.get("command") for r in group if r.get("command")})
            fig.suptitle(f"{case} on {device}", fontsize=10)
            fig.text(0.01, 0.005, "\n".join(commands), fontsize=6, family="monospace", va="bottom")
            fig.tight_layout(rect=(0, 0.03 + 0.02 * len(commands), 1, 0.95))
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / files[0].name
            fig.savefig(path, dpi=110, metadata={"Software": None})
            plt.close(fig)
            written.append(path)
    return written


# --- command line -------------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="run.py report", description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=pathlib.Path, default=None,
                        help=f"JSON-lines results (default: {DEFAULT_RESULTS.relative_to(REPO)})")
    parser.add_argument("--page", "--readme", dest="pages", type=pathlib.Path, action="append", default=None,
                        help="a Markdown page holding blocks (repeatable; default: "
                             f"{', '.join(str(p.relative_to(REPO)) for p in PAGES)})")
    parser.add_argument("--plots", type=pathlib.Path, default=PLOTS, help="folder the PNG figures go to")
    parser.add_argument("--check", action="store_true", help="exit 1 if a page's tables are not the results'")
    args = parser.parse_args(argv)
    results = args.results or DEFAULT_RESULTS
    pages = args.pages or list(PAGES)
    try:
        if args.results is not None and not results.is_file():
            raise FileNotFoundError(f"results file not found: {results}")
        records = load_results(results) if results.is_file() else []
        rendered = render_pages(pages, records, args.plots)
    except (OSError, ValueError) as error:
        print(f"run.py report: error: {error}", file=sys.stderr)
        return 2
    stale = {page: [name for name in blocks_in(text) if _block(text, name) != _block(new, name)]
             for page, (text, new) in rendered.items() if new != text}
    if args.check:
        for page, names in stale.items():
            print(f"run.py report: {page} is stale in {', '.join(names)}: run `python benchmarks/run.py report"
                  f"{' --results ' + str(args.results) if args.results else ''}`", file=sys.stderr)
        return 1 if stale else 0
    for page in stale:
        write_atomic(page, rendered[page][1])
    for path in write_plots(records, args.plots):
        print(f"wrote {path}")
    for page, (text, _) in rendered.items():
        print(f"{page}: {len(blocks_in(text))} blocks from {len(records)} records in {results}")
    return 0


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Temp file in the same folder, fsync, rename: a killed report never leaves half a README."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _block(text: str, name: str) -> str:
    begin, end = marker(name, "begin"), marker(name, "end")
    return text[text.index(begin):text.index(end)] if begin in text and end in text else ""
