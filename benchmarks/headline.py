"""The README's headline table: a few rows picked from the latest benchmark records, each with its
device and the command that reproduces it. `python benchmarks/run.py report` writes it between the
`<!-- perf:headline:begin/end -->` markers of README.md; a row without a measurement says so.
"""
from __future__ import annotations

from benchmarks.report import baseline_cell, contig_length, fmt_bytes, fmt_number, fmt_percent, fmt_seconds, memory_bytes


def _pick(records: list[dict], case: str, **fields) -> dict | None:
    """The record of `case` whose fields (and shapes entries, as `shapes_KEY`) equal `fields`;
    with several, the one of the largest batch."""
    def matches(record):
        shapes = record.get("shapes") or {}
        return all((shapes.get(k[len("shapes_"):]) if k.startswith("shapes_") else record.get(k)) == v
                   for k, v in fields.items())
    found = [r for r in records if r.get("case") == case and matches(r)]
    return max(found, key=lambda r: r.get("batch") or 0) if found else None


def _parity(records):
    r = _pick(records, "forward", config="base", impl="jax", dtype="float32")
    diff = ((r or {}).get("extra") or {}).get("max_abs_diff_vs_torch")
    return r, (None if diff is None else
               f"largest difference of the last hidden state from the PyTorch reference gLM: {diff:.1e} "
               f"(float32, same random weights, {r.get('batch')} windows of 30 genes)")


def _train_step(dtype: str):
    def row(records):
        r = _pick(records, "train_step", config="base", impl="jax", dtype=dtype)
        if not r or r.get("status", "ok") != "ok":
            return r, None
        mfu = r.get("mfu_datasheet") if r.get("mfu_datasheet") is not None else r.get("mfu_measured_peak")
        kind = "of the bf16 data-sheet peak" if r.get("mfu_datasheet") is not None else "of the measured matmul rate"
        return r, (f"{fmt_number(r.get('items_per_s'))} {r.get('items_unit')} at batch {r.get('batch')}, "
                   f"MFU {fmt_percent(mfu)} {kind}, {baseline_cell(r) or 'no baseline'}")
    return row


def _long_contig(records):
    """`blockwise` at the longest contig it ran (float32 forward+backward first), and `reference` there."""
    def at(record, length, impl):
        return (record.get("case") == "attention" and record.get("impl") == impl
                and contig_length(record) == length)
    ok = [r for r in records if r.get("case") == "attention" and r.get("impl") == "blockwise"
          and r.get("status", "ok") == "ok" and contig_length(r) is not None]
    if not ok:
        return None, None
    length = max(contig_length(r) for r in ok)
    r = max((r for r in ok if contig_length(r) == length),
            key=lambda r: (r.get("dtype") == "float32", (r.get("shapes") or {}).get("pass") == "forward_backward"))
    step = str((r.get("shapes") or {}).get("pass") or "call").replace("_", "+")
    ref = next((x for x in records if at(x, length, "reference") and x.get("dtype") == r.get("dtype")
                and (x.get("shapes") or {}).get("pass") == (r.get("shapes") or {}).get("pass")), None)
    ref_text = ("" if not ref else f"; `reference`: {fmt_bytes(memory_bytes(ref))}" if ref.get("status", "ok") == "ok"
                else f"; `reference`: {ref.get('status')} ({ref.get('reason')})")
    return r, (f"`blockwise` attention, one layer's {step} on {length:,}-gene contigs ({r.get('dtype')}): "
               f"peak {fmt_bytes(memory_bytes(r))}{ref_text}")


def _esm2_stage(records):
    r = _pick(records, "esm2", impl="jax", dtype="float32", shapes_length="stage")
    if not r or r.get("status", "ok") != "ok":
        return r, None
    proteins = (r.get("shapes") or {}).get("proteins")
    return r, (f"the `embed-proteins` stage on {proteins:,} distinct proteins of `data/genomes/`: "
               f"{fmt_seconds(r.get('median_s'))} "
               f"({fmt_number(r.get('items_per_s'))} {r.get('items_unit')}, float32, cold, compilation included)")


def _input_pipeline(records):
    r = _pick(records, "input_pipeline", impl="ShardReader")
    if not r or r.get("status", "ok") != "ok":
        return r, None
    return r, (f"TFRecord `ShardReader`: {fmt_number(r.get('items_per_s'))} {r.get('items_unit')} at gLM-base "
               f"width, {baseline_cell(r)}")


def _data_pipeline(records):
    """make-shards' peak memory at the largest corpus it streamed."""
    ok = [r for r in records if r.get("case") == "data_pipeline" and r.get("impl") == "make-shards"
          and r.get("status", "ok") == "ok"
          and isinstance((r.get("shapes") or {}).get("genes"), int)]
    if not ok:
        return None, None
    r = max(ok, key=lambda r: r["shapes"]["genes"])
    extra, shapes = r.get("extra") or {}, r["shapes"]
    embedder = str(shapes.get("esm2") or "")
    embedder = (f", {embedder} embedder" + (" (a stand-in for ESM2)" if embedder.startswith("hash") else "")
                if embedder else "")
    return r, (f"streaming `make-shards` of {shapes['genes']:,} genes{embedder}: peak memory "
               f"{fmt_bytes(extra.get('peak_rss_bytes'))}, {fmt_seconds(r.get('median_s'))}")


# (what, row builder: records -> (record, text or None)); a row without a measurement says so
HEADLINE = (
    ("parity with the original", _parity),
    ("training step, gLM-base float32", _train_step("float32")),
    ("training step, gLM-base bfloat16", _train_step("bfloat16")),
    ("attention memory, long contigs", _long_contig),
    ("protein embeddings (ESM2-8M)", _esm2_stage),
    ("input pipeline", _input_pipeline),
    ("data pipeline at metagenome scale", _data_pipeline),
)


def device_cell(record: dict) -> str:
    threads = f", {record['cpu_count']} threads" if record.get("platform") == "cpu" and record.get("cpu_count") else ""
    return f"{record.get('device')} ({record.get('platform')}{threads})"


def block(records: list[dict]) -> str:
    lines = ["| what | measured | device | reproduce |", "|---|---|---|---|"]
    for what, build in HEADLINE:
        record, text = build(records)
        if text is None:
            lines.append(f"| {what} | not measured yet | | |")
        else:
            lines.append(f"| {what} | {text} | {device_cell(record)} | `{record.get('command') or '?'}` |")
    return "\n".join(lines)
