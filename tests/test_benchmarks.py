"""The benchmark harness: recorder schema, timing, the report generator, and every case end to end
at toy size (`--quick`; the only place benchmarks run in CI -- no timing is asserted)."""
import datetime
import json
import re
import sys
import types

import jax
import pytest

from helpers import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # the benchmarks package lives beside glm_jax, not installed
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import recorder as recorder_module  # noqa: E402
from benchmarks import report, run, timing  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- recorder -----------------------------------------------------------------------------------

def test_recorder_fills_the_schema_and_appends(tmp_path):
    path = tmp_path / "sub" / "results.jsonl"
    rec = recorder_module.Recorder(path, command=["train_step", "--quick"], echo=False)
    rec.record(case="train_step", config="tiny", impl="jax", dtype="float32", batch=8, shapes={"genes": 30},
               median_s=0.5, min_s=0.4, max_s=0.6, repeats=3, compile_s=2.0, items_per_s=16.0,
               items_unit="contigs/s", model_flops=1e9, devices=1)
    rec.record(case="train_step", config="tiny", impl="torch_compile", dtype="float32", status="failed",
               reason="no C++ compiler")
    first, second = read_jsonl(path)
    assert list(first) == list(recorder_module.FIELDS)
    assert first["platform"] == jax.default_backend() == "cpu"
    assert first["device"] and first["cpu_count"] >= 1
    assert first["versions"]["jax"] == jax.__version__ and first["versions"]["python"].count(".") == 2
    assert first["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", first["commit"]["sha"])
    assert first["command"] == "python benchmarks/run.py train_step --quick"
    assert datetime.datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    assert first["status"] == "ok" and first["mfu_datasheet"] is None  # no data-sheet peak for CPUs
    assert second["status"] == "failed" and second["reason"] == "no C++ compiler" and second["median_s"] is None


def test_recorder_refuses_malformed_records(tmp_path):
    rec = recorder_module.Recorder(tmp_path / "r.jsonl", echo=False)
    with pytest.raises(TypeError, match="unknown record fields"):
        rec.record(case="x", config="c", impl="i", median_s=1.0, seconds=1.0)
    with pytest.raises(TypeError, match="median_s"):
        rec.record(case="x", config="c", impl="i")
    with pytest.raises(TypeError, match="reason"):
        rec.record(case="x", config="c", impl="i", status="skipped")
    with pytest.raises(ValueError, match="status"):
        rec.record(case="x", config="c", impl="i", status="great", reason="?")
    assert not (tmp_path / "r.jsonl").exists()


def test_recorder_datasheet_mfu_on_accelerators(tmp_path, monkeypatch):
    fake = {"platform": "gpu", "device": "NVIDIA H100 80GB HBM3", "cpu_count": 16, "versions": {}, "commit": None}
    monkeypatch.setattr(recorder_module, "environment", lambda: fake)
    rec = recorder_module.Recorder(tmp_path / "r.jsonl", echo=False)
    # 2 devices reaching 0.25 * 989 TFLOP/s each (the H100 SXM bf16 dense data sheet)
    out = rec.record(case="train_step", config="base", impl="jax", dtype="bfloat16", median_s=2.0,
                     model_flops=2.0 * 2 * 0.25 * 989e12, devices=2)
    assert out["mfu_datasheet"] == pytest.approx(0.25)
    fake["device"] = "TPU v5 lite"
    assert rec.record(case="c", config="c", impl="i", median_s=1.0, model_flops=197e12)["mfu_datasheet"] == \
        pytest.approx(1.0)


# --- timing -------------------------------------------------------------------------------------

def test_time_fn_separates_the_first_call(monkeypatch):
    clock = {"now": 0.0}
    durations = iter([5.0, 0.3, 0.1, 0.2, 0.4])  # first call compiles; warmup=2 drops the 0.3

    def fn(x):
        clock["now"] += next(durations)
        return x

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    out = timing.time_fn(fn, 1, repeats=3, warmup=2)
    assert out == pytest.approx({"median_s": 0.2, "min_s": 0.1, "max_s": 0.4, "repeats": 3, "compile_s": 4.8})
    with pytest.raises(ValueError):
        timing.time_fn(fn, 1, repeats=1, warmup=0)


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_measured_matmul_peak_is_a_rate(framework):
    assert 1e6 < timing.measured_matmul_peak("float32", framework, n=256) < 1e15


# --- report -------------------------------------------------------------------------------------

def result(**fields):
    base = {name: None for name in recorder_module.FIELDS}
    base.update(platform="cpu", device="Test CPU 9000", cpu_count=2, versions={"jax": "0.10.2", "torch": "2.13"},
                commit={"sha": "a" * 40, "dirty": False}, status="ok", shapes={}, extra={},
                timestamp="2026-01-01T00:00:00+00:00")
    base.update(fields)
    base["command"] = base["command"] or f"python benchmarks/run.py {base['case']}"
    return base


SYNTHETIC = [
    # an older measurement of the same thing: the later one must win
    result(case="train_step", config="base", impl="jax", dtype="float32", batch=8, median_s=9.0, items_per_s=0.889,
           items_unit="contigs/s", timestamp="2025-01-01T00:00:00+00:00"),
    result(case="train_step", config="base", impl="jax", dtype="float32", batch=8, median_s=4.0, items_per_s=2.0,
           items_unit="contigs/s", baseline="torch_eager float32", ratio_vs_baseline=1.5, mfu_measured_peak=0.3125,
           extra={"genes_per_s": 43210.0}, command="python benchmarks/run.py train_step --configs base --batch 8,32"),
    result(case="train_step", config="base", impl="jax", dtype="float32", batch=32, median_s=12.0,
           items_per_s=2.667, items_unit="contigs/s", mfu_measured_peak=0.41),
    result(case="train_step", config="base", impl="torch_eager", dtype="float32", batch=8, median_s=6.0,
           items_per_s=1.333, items_unit="contigs/s"),
    result(case="train_step", config="base", impl="torch_compile", dtype="float32", batch=8, status="failed",
           reason="InductorError: no compiler"),
    result(case="esm2", config="esm2-8M", impl="jax", dtype="float32", batch=64, shapes={"length": 64},
           median_s=0.05, items_per_s=1280.0, items_unit="proteins/s"),
    result(case="esm2", config="esm2-8M", impl="jax", dtype="float32", batch=16, shapes={"length": 512},
           median_s=0.2, items_per_s=80.0, items_unit="proteins/s"),
    result(case="attention", config="base heads", impl="blockwise", dtype="float32", batch=2,
           shapes={"seq_len": 2048}, median_s=0.0123, extra={"peak_memory_bytes": 3 * 2 ** 30}),
    result(case="attention", config="base heads", impl="blockwise", dtype="float32", batch=8,
           shapes={"seq_len": 512}, median_s=0.0021, extra={"peak_memory_bytes": 5 * 2 ** 20}),
    result(case="input_pipeline", config="1281-d", impl="ShardReader", dtype="float32", batch=32,
           status="skipped", reason="tensorflow is not installed", device="NVIDIA H100 80GB HBM3", platform="gpu"),
]


def readme_with_markers(path):
    text = "# Title\n\n" + "".join(f"## {name}\n{report.marker(name, 'begin')}\nold\n{report.marker(name, 'end')}\n"
                                   for name in report.BLOCKS) + "trailing text\n"
    path.write_text(text)
    return path


def write_results(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_writes_tables_and_plots(tmp_path):
    results = write_results(tmp_path / "results.jsonl", SYNTHETIC)
    readme = readme_with_markers(tmp_path / "README.md")
    plots = tmp_path / "plots"
    assert report.main(["--results", str(results), "--page", str(readme), "--plots", str(plots)]) == 0
    text = readme.read_text()
    train = report._block(text, "train_step")
    assert "**Test CPU 9000** (cpu, 2 CPU threads; jax 0.10.2, torch 2.13" in train
    assert "`python benchmarks/run.py train_step --configs base --batch 8,32`" in train
    assert "| base | 8 | jax | float32 | 4 s | 2 contigs/s | 43,210 | 1.50x vs torch_eager float32 | 31.2% |" in train
    assert "9 s" not in train and "0.889" not in train  # the older record lost
    assert "| 12 s | 2.67 contigs/s |" in train and "41.0%" in train
    assert "failed: InductorError: no compiler" in train
    assert "MFU (bf16 data sheet)" not in train  # empty column dropped (CPU)
    esm2_rows = [line for line in report._block(text, "esm2").splitlines() if line.startswith("| esm2-8M")]
    assert "length=64" in esm2_rows[0] and "length=512" in esm2_rows[1]  # sorted by length, not batch
    attention = report._block(text, "attention")
    assert "3 GiB" in attention and "5 MiB" in attention and "12.3 ms" in attention
    pipeline = report._block(text, "input_pipeline")
    assert "**NVIDIA H100 80GB HBM3** (gpu" in pipeline and "skipped: tensorflow is not installed" in pipeline
    assert "| `configs/glm_base.py` | 278.9 M |" in report._block(text, "scaling")
    assert "_No `forward` measurements" in report._block(text, "forward")
    assert text.startswith("# Title\n") and text.endswith("trailing text\n")
    written = sorted(p.name for p in plots.iterdir())
    assert written == ["attention_time_memory_vs_length_test-cpu-9000.png",
                       "esm2_proteins_per_s_vs_length_test-cpu-9000.png",
                       "train_step_mfu_vs_batch_test-cpu-9000.png"]
    assert all((plots / name).read_bytes().startswith(PNG_MAGIC) for name in written)
    assert "](plots/train_step_mfu_vs_batch_test-cpu-9000.png)" in train  # relative to the page
    headline = report._block(text, "headline")
    assert "| training step, gLM-base float32 | 2.67 contigs/s at batch 32, MFU 41.0% of the measured matmul rate, " \
           "no baseline | Test CPU 9000 (cpu, 2 threads) | `python benchmarks/run.py train_step` |" in headline
    assert "on 2,048-gene contigs (float32): peak 3 GiB |" in headline
    assert "| parity with the original | not measured yet |" in headline
    assert report.plot_series("train_step", report.latest(SYNTHETIC)) == {
        "base/jax float32": [(8, 0.3125), (32, 0.41)]}

    # --check: clean now; a newer record makes the README stale, and --check leaves it alone
    assert report.main(["--results", str(results), "--page", str(readme), "--plots", str(plots), "--check"]) == 0
    newer = result(case="forward", config="base", impl="jax", dtype="float32", batch=32, median_s=1.0,
                   items_per_s=32.0, items_unit="contigs/s", timestamp="2027-01-01T00:00:00+00:00")
    write_results(results, SYNTHETIC + [newer])
    assert report.main(["--results", str(results), "--page", str(readme), "--plots", str(plots), "--check"]) == 1
    assert readme.read_text() == text


def test_a_rerun_at_a_newer_commit_replaces_the_whole_old_sweep():
    """Rows of shapes the new run no longer measures (old ESM2 bucket lengths) go too; another
    command's rows stay."""
    def esm2(length, sha, day, command=None):
        return result(case="esm2", config="esm2-8M", impl="jax", dtype="float32", batch=2, median_s=1.0,
                      shapes={"length": length}, commit={"sha": sha * 40, "dirty": False},
                      timestamp=f"2026-01-{day:02d}T00:00:00+00:00", command=command)

    other = esm2(2048, "a", 1, command="python benchmarks/run.py esm2 --max-residues 2046")
    kept = report.latest([esm2(1536, "a", 1), esm2(1024, "a", 1), other, esm2(1280, "b", 2), esm2(1024, "b", 2)])
    assert sorted(r["shapes"]["length"] for r in kept) == [1024, 1280, 2048]
    assert all(r["commit"]["sha"] == "b" * 40 for r in kept if r is not other)


def test_report_errors_name_the_file(tmp_path, capsys):
    readme = readme_with_markers(tmp_path / "README.md")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SYNTHETIC[0]) + "\n{not json\n")
    assert report.main(["--results", str(bad), "--readme", str(readme)]) == 2
    assert f"{bad}:2: not a JSON record" in capsys.readouterr().err
    assert report.main(["--results", str(tmp_path / "none.jsonl"), "--readme", str(readme)]) == 2
    assert "results file not found" in capsys.readouterr().err
    readme.write_text("no markers here\n")
    assert report.main(["--results", str(write_results(tmp_path / "r.jsonl", [])), "--readme", str(readme)]) == 2
    assert "perf:train_step:begin" in capsys.readouterr().err and readme.read_text() == "no markers here\n"


def test_blocks_may_sit_in_any_page_and_each_must_be_in_one(tmp_path, capsys):
    """README.md holds the headline, another page the rest; a block in no page is an error."""
    results = write_results(tmp_path / "results.jsonl", SYNTHETIC)
    readme, perf = tmp_path / "README.md", tmp_path / "docs" / "performance.md"
    perf.parent.mkdir()
    readme.write_text(f"# R\n{report.marker('headline', 'begin')}\n{report.marker('headline', 'end')}\n")
    perf.write_text("".join(f"{report.marker(n, 'begin')}\n{report.marker(n, 'end')}\n"
                            for n in report.BLOCKS if n != "headline"))
    pages = ["--page", str(readme), "--page", str(perf)]
    assert report.main(["--results", str(results), *pages, "--plots", str(tmp_path / "docs" / "img")]) == 0
    assert "| training step, gLM-base float32 |" in readme.read_text()
    assert "](img/train_step_mfu_vs_batch_test-cpu-9000.png)" in perf.read_text()
    assert report.main(["--results", str(results), *pages, "--plots", str(tmp_path / "docs" / "img"), "--check"]) == 0
    perf.write_text(perf.read_text().replace(report.marker("scaling", "end"), "").replace(
        report.marker("scaling", "begin"), ""))
    assert report.main(["--results", str(results), *pages, "--check"]) == 2
    assert "perf:scaling:begin" in capsys.readouterr().err


def test_headline_takes_the_largest_streamed_corpus():
    def streamed(genes, rss):
        return result(case="data_pipeline", config=f"{genes} genes", impl="make-shards", dtype="float16",
                      batch=None, shapes={"genes": genes, "esm2": "hash 256-d"}, median_s=genes / 1e4,
                      extra={"peak_rss_bytes": rss})
    rows = report.headline_block(report.latest([streamed(10 ** 6, 2 ** 30), streamed(10 ** 4, 2 ** 29)]))
    assert ("| data pipeline at metagenome scale | streaming `make-shards` of 1,000,000 genes, hash 256-d embedder "
            "(a stand-in for ESM2): peak memory 1 GiB, 100 s | Test CPU 9000 (cpu, 2 threads) |") in rows


def test_pages_are_what_the_committed_results_give():
    """README.md's headline and docs/performance.md's tables (`python benchmarks/run.py report --check`)."""
    assert report.main(["--check"]) == 0, "generated tables are stale: python benchmarks/run.py report"


# --- harness and cases --------------------------------------------------------------------------

def test_harness_reports_missing_and_crashing_cases(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(run.CASES, "absent", ("benchmarks.cases.not_written_yet", "nothing"))
    assert run.main(["absent", "--quick"]) == 2
    assert "benchmarks/cases/not_written_yet.py is not in this checkout" in capsys.readouterr().err

    def crash(args, recorder):
        recorder.record(case="boom", config="c", impl="i", median_s=1.0)
        raise RuntimeError("out of memory")

    module = types.SimpleNamespace(__doc__="A case that crashes.", add_arguments=lambda parser: None, run=crash)
    monkeypatch.setitem(sys.modules, "fake_boom_case", module)
    monkeypatch.setitem(run.CASES, "boom", ("fake_boom_case", "crashes"))
    output = tmp_path / "out.jsonl"
    assert run.main(["boom", "--quick", "--output", str(output)]) == 1
    kept, failed = read_jsonl(output)
    assert kept["status"] == "ok" and failed["status"] == "failed" and "out of memory" in failed["reason"]


def test_a_malformed_protein_fasta_is_one_line_and_no_record(tmp_path, capsys):
    """Bad user data is not a crash: one line naming the file and record, exit 2, no traceback,
    no results file (it used to print a traceback and append a 'failed' record)."""
    fasta = tmp_path / "bad.fa"
    fasta.write_text(">ok\nMKTAYIAK\n>broken\nMKJ1A\n")
    output = tmp_path / "out.jsonl"
    assert run.main(["esm2", "--stage", "--quick", "--fasta", str(fasta), "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "run.py esm2: error:" in err and "bad.fa: record 'broken'" in err and not output.exists()


UNKNOWN_CONFIG = "unknown config ['nope']; choose from ['base', 'tiny']"


@pytest.mark.parametrize("argv, expected", [
    (["train_step", "--configs", "base,nope"], UNKNOWN_CONFIG),
    (["forward", "--configs", "base,nope"], UNKNOWN_CONFIG),
    (["esm2", "--attention", "dot_product,flash"], "unknown ESM2 attention ['flash']; choose from ['dot_product', "
                                                   "'query_blocks']"),
])
def test_an_unknown_name_is_a_usage_error_before_anything_runs(argv, expected, tmp_path, capsys):
    """One argparse line naming the bad name and the choices; no record written (it used to be a
    KeyError or ConfigError traceback from inside the case, and a 'failed' record)."""
    output = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exit_:
        run.main([*argv, "--output", str(output)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and expected in err
    assert "Traceback" not in err and not output.exists()


def test_without_a_pytorch_reference_jax_is_still_measured(tmp_path, monkeypatch):
    """transformers 5 (the GPU image) cannot build the reference: JAX runs, PyTorch is skipped."""
    from glm_jax.interop import torch_reference

    def refuse(config, seed=0):
        raise RuntimeError("transformers 5.17 ignores position_embedding_type='relative_key_query'")

    monkeypatch.setattr(torch_reference, "build_reference", refuse)
    output = tmp_path / "r.jsonl"
    assert run.main(["forward", "--quick", "--output", str(output)]) == 0
    torch_record, jax_record = read_jsonl(output)
    assert torch_record["status"] == "skipped" and "ignores position_embedding_type" in torch_record["reason"]
    assert jax_record["status"] == "ok" and jax_record["baseline"] is None and jax_record["median_s"] > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    """Every registered case at toy size into one results file -> its records."""
    output = tmp_path_factory.mktemp("bench") / "results.jsonl"
    narrower = {"attention": ["--dtypes", "float32"],  # one dtype is enough to check the plumbing
                "esm2": ["--attention", "query_blocks,dot_product"]}
    codes = {name: run.main([name, "--quick", "--output", str(output), *narrower.get(name, [])])
             for name in run.CASES}
    return codes, read_jsonl(output)


@pytest.mark.parametrize("case", list(run.CASES))
def test_case_runs_end_to_end(case, quick_results):
    codes, records = quick_results
    if case == "attention" and codes[case] == 2:
        pytest.skip("benchmarks/cases/attention.py is not in this checkout yet")
    assert codes[case] == 0
    mine = [r for r in records if r["case"] == case and r["status"] == "ok"]
    others = [r for r in records if r["case"] == case and r["status"] != "ok"]
    assert mine and all(r["status"] == "skipped" and r["reason"] for r in others), [r["reason"] for r in others]
    assert all(r["median_s"] > 0 and r["repeats"] == 1 for r in mine)
    by_impl = {(r["impl"], r["dtype"], r["batch"], json.dumps(r["shapes"])): r for r in mine}
    for r in mine:  # every ratio is the named baseline's median over this one's, from the same run
        if r["ratio_vs_baseline"] is not None and case != "input_pipeline":
            impl, dtype = (r["baseline"].split() + [r["dtype"]])[:2]
            base = by_impl[(impl, dtype, r["batch"], json.dumps(r["shapes"]))]
            assert r["ratio_vs_baseline"] == pytest.approx(base["median_s"] / r["median_s"])
    if case in ("train_step", "forward"):
        assert {r["impl"] for r in mine} == {"jax", "torch_eager"}
        assert all(0 < r["mfu_measured_peak"] for r in mine)
    if case == "forward":
        assert next(r for r in mine if r["impl"] == "jax")["extra"]["max_abs_diff_vs_torch"] < 1e-4
    if case == "esm2":
        for attention in ("query_blocks", "dot_product"):  # each timed as its own side against EsmModel
            jax_rows = [r for r in mine if r["impl"] == f"jax-{attention}" and r["shapes"]["length"] != "all"]
            assert jax_rows and all(r["extra"]["max_abs_diff_pooled_vs_torch"] < 1e-4 for r in jax_rows)
            assert {r["extra"]["attention"] for r in jax_rows} == {attention}
            total = next(r for r in mine if r["impl"] == f"jax-{attention}" and r["shapes"]["length"] == "all")
            assert total["shapes"]["proteins"] == 6 and total["shapes"]["batch_shapes"] == len(jax_rows)
    if case == "input_pipeline":
        assert {r["impl"] for r in mine} == {"InMemoryWindows", "ShardWriter", "ShardReader"}
        for r in mine:  # readers against the train step of the same results file (tiny, quick)
            assert r["baseline"].startswith("train_step tiny jax float32 batch=8")
            assert r["ratio_vs_baseline"] == pytest.approx(r["items_per_s"] / r["extra"]["train_windows_per_s"])


def _git_checkout() -> bool:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _git_checkout(), reason="--stage-baseline needs this repository's git history")
def test_esm2_stage_times_cold_runs_of_this_checkout_and_a_baseline_commit(tmp_path):
    """--stage: embed_proteins in fresh processes, of this checkout and (--stage-baseline) of a
    commit's source, each embedding every sampled protein into a fresh store (the harness checks
    the worker's embedded and stored counts, and that the baseline ran the commit's glm_jax, not
    this checkout's); one record per side, the baseline's median over this one's as the ratio."""
    import subprocess

    output = tmp_path / "stage.jsonl"
    assert run.main(["esm2", "--quick", "--stage", "--stage-baseline", "HEAD", "--output", str(output)]) == 0
    baseline, current = read_jsonl(output)
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (baseline["impl"], current["impl"]) == ("jax@HEAD", "jax") and baseline["extra"]["source_commit"] == head
    assert baseline["baseline"] == current["baseline"] == "jax@HEAD" and baseline["ratio_vs_baseline"] == 1.0
    assert current["ratio_vs_baseline"] == pytest.approx(baseline["median_s"] / current["median_s"])
    assert current["shapes"] == baseline["shapes"] and current["shapes"]["length"] == "stage"
    assert current["shapes"]["proteins"] == 6 and current["repeats"] == 1 and current["median_s"] > 0
    assert current["extra"]["attention"] == "query_blocks"  # CPU float32's default
    assert current["extra"]["padded_tokens"] >= current["extra"]["tokens"] > current["shapes"]["residues"]


def test_esm2_stage_baseline_that_is_not_a_commit_or_without_stage_is_one_line(tmp_path, capsys):
    output = tmp_path / "stage.jsonl"
    assert run.main(["esm2", "--quick", "--stage", "--stage-baseline", "no-such-ref", "--output", str(output)]) == 2
    assert "--stage-baseline no-such-ref: not a commit" in capsys.readouterr().err and not output.exists()
    assert run.main(["esm2", "--quick", "--stage-baseline", "HEAD", "--output", str(output)]) == 2
    assert "it needs --stage" in capsys.readouterr().err and not output.exists()


def test_gpu_session_steps_are_valid_commands(tmp_path):
    """Every step benchmarks/gpu_session.sh would run parses as the harness (or pytest) reads it and
    names files that exist: an option typo found on a lent GPU costs part of its 30 minutes."""
    import os
    import shlex
    import subprocess

    from glm_jax.proteins import esm2

    done = subprocess.run(["bash", "benchmarks/gpu_session.sh", str(tmp_path), "all"], cwd=REPO_ROOT, check=True,
                          env={**os.environ, "GLM_JAX_GPU_SESSION_DRY": "1"}, capture_output=True, text=True)
    steps = [shlex.split(line) for line in done.stdout.splitlines()]
    benchmarks = [step[2:] for step in steps if step[1] == "benchmarks/run.py"]
    # data_pipeline writes TFRecords from genome files: the GPU image has neither TensorFlow nor Biopython;
    # store_lookup measures the host's disk and page cache, not the accelerator
    assert set(case for case, *_ in benchmarks) == set(run.CASES) - {"data_pipeline", "store_lookup"}
    attentions = set()
    for case, *options in benchmarks:
        args = run.case_parser(case, run.load_case(case)).parse_args(options)
        assert args.output == tmp_path / "results.jsonl"
        if case == "esm2":
            assert args.fasta.is_file()
            attentions.update(args.attention)
    assert attentions == set(esm2.ATTENTION)
    (pytest_step,) = [step for step in steps if step[1:3] == ["-m", "pytest"]]
    assert (REPO_ROOT / pytest_step[-1]).is_file()
    assert subprocess.run(["bash", "benchmarks/gpu_session.sh", str(tmp_path), "everything"], cwd=REPO_ROOT,
                          capture_output=True, text=True).returncode == 2
