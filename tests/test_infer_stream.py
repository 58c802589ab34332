"""Streaming `infer`: the same tables as the code before streaming (golden), and runs of several
processes equal to one process row by row, also after a process was killed."""
import json
import os
import sys

import jax
import pandas as pd
import pytest

import infer_golden
import infer_subprocess
from glm_jax.inference import genome, plan


@pytest.fixture(scope="module")
def setup(tiny_esm2_dir, tmp_path_factory):
    return infer_golden.make_setup(tmp_path_factory.mktemp("infer_stream"), tiny_esm2_dir)


def test_tables_equal_the_golden_of_the_code_before_streaming(setup):
    out = genome.infer_genomes([infer_golden.META], setup["root"] / "model", setup["root"] / "golden",
                               **setup["common"], **infer_golden.OPTIONS, log=lambda _: None)
    genes, pairs = genome.read_gene_table(out), genome.read_pair_table(out)
    if os.environ.get("GLM_JAX_RECORD_GOLDEN"):
        infer_golden.projected(genes).to_parquet(infer_golden.GENES_GOLDEN, index=False)
        infer_golden.projected(pairs).to_parquet(infer_golden.PAIRS_GOLDEN, index=False)
    infer_golden.compare(genes, pd.read_parquet(infer_golden.GENES_GOLDEN))
    infer_golden.compare(pairs, pd.read_parquet(infer_golden.PAIRS_GOLDEN))


def test_repeated_gene_ids_are_suffixed_in_input_order_without_holding_every_id():
    """Only the ids whose hash repeats are counted; the first keeps its id, later ones get #2, #3."""
    from glm_jax.data.genomes import Contig, Gene
    gene = lambda i: Gene(i, "MK", 1, None, None, "c")  # noqa: E731
    contigs = [Contig("c1", "f", (gene("a"), gene("b"), gene("a"))), Contig("c2", "f", (gene("a"), gene("c")))]
    windowed = list(plan.genome_windows(contigs, 2, 1))
    survey = plan.survey(windowed, chunk_windows=2)
    assert survey.repeated_ids == {hash("a")} and (survey.genes, survey.windows, survey.chunks) == (5, 3, 2)
    assert list(survey.chunk_starts) == [0, 3]  # chunk 1 starts at c2's first gene
    ids = [w.contig.gene_ids for w in plan.planned_windows(windowed, survey)]
    assert ids == [("a", "b", "a#2"), ("a", "b", "a#2"), ("a#3", "c")]


# --- several processes ------------------------------------------------------------------------------

def cli_command(setup, out):
    o = infer_subprocess.DISTRIBUTED_OPTIONS
    return [sys.executable, "-m", "glm_jax.cli.main", "infer", str(infer_golden.META),
            "--checkpoint", str(setup["root"] / "model"), "--output", str(out),
            "--store", str(setup["common"]["store_dir"]), "--esm2-model", str(setup["esm2"]),
            "--window", str(o["window"]), "--stride", str(o["stride"]), "--batch-size", str(o["batch_size"]),
            "--chunk-windows", str(o["chunk_windows"]), "--attention", o["attention"], "--hypotheses",
            "--no-progress", "--distributed"]


@pytest.fixture(scope="module")
def one_process(setup):
    """The distributed tests' options in this process, one window per call on one device (as each
    device of the 2-process runs computes: so the results are bitwise equal)."""
    options = {**infer_subprocess.DISTRIBUTED_OPTIONS, "batch_size": 1}
    return genome.infer_genomes([infer_golden.META], setup["root"] / "model", setup["root"] / "one",
                                **setup["common"], **options, devices=jax.devices()[:1], log=lambda _: None)


def assert_same_tables(a, b):
    pd.testing.assert_frame_equal(genome.read_gene_table(a), genome.read_gene_table(b))
    pd.testing.assert_frame_equal(genome.read_pair_table(a), genome.read_pair_table(b))


@pytest.mark.multiprocess
def test_two_processes_write_the_tables_of_one(setup, one_process, tmp_path):
    from multiprocess import run_processes
    result = run_processes(cli_command(setup, tmp_path / "two"), processes=2, devices_per_process=2)
    assert result.codes == [0, 0], str(result)
    assert_same_tables(tmp_path / "two", one_process)
    runs = json.loads((tmp_path / "two" / "manifest.json").read_text())["runs"]
    chunks = -(-json.loads((one_process / "manifest.json").read_text())["summary"]["windows"] // 4)
    assert [r["computed_chunks"] for r in runs] == [list(range(0, chunks, 2)), list(range(1, chunks, 2))]
    assert not (tmp_path / "two" / "parts").exists()


@pytest.mark.multiprocess
def test_a_killed_process_is_rerun_for_its_missing_chunks_only(setup, one_process, tmp_path):
    """Process 1 dies writing its 2nd chunk (3); process 0 is stopped when its peer is lost. The
    rerun (2 processes, from the command line) computes exactly the chunks not written."""
    from multiprocess import run_processes
    out = tmp_path / "killed"
    script = [sys.executable, infer_subprocess.__file__, "--distributed", "1", "3", str(infer_golden.META),
              str(setup["root"] / "model"), str(out), str(setup["common"]["store_dir"]), str(setup["esm2"])]
    killed = run_processes(script, processes=2, devices_per_process=2)
    assert killed.codes[1] == 128 + 9 and killed.codes[0] != 0, str(killed)
    assert not (out / "genes.parquet").exists()
    written = {int(p.stem.split("-")[1]) for p in (out / "parts").glob("genes-*.parquet")}
    assert 1 in written and 3 not in written and (out / "parts" / "pairs-00003.parquet").is_file()
    rerun = run_processes(cli_command(setup, out), processes=2, devices_per_process=2)
    assert rerun.codes == [0, 0], str(rerun)
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    chunks = -(-json.loads((out / "manifest.json").read_text())["summary"]["windows"] // 4)
    computed = sorted(n for r in runs for n in r["computed_chunks"])
    assert computed == sorted(set(range(chunks)) - written) and 3 in computed
    assert_same_tables(out, one_process)


def test_bad_metagenome_inputs_are_one_line_errors_and_leave_nothing(setup, tmp_path, capsys):
    """A contig table naming a protein the FASTA lacks; the same contig id in two files; a store of
    another ESM2 model: one line naming the file and record, exit 2, no output directory."""
    from glm_jax.cli import main as cli
    proteins = [p for genes in setup["records"].values() for _, p, _ in genes][:6]
    (tmp_path / "a.faa").write_text("".join(f">p{i}\n{p}\n" for i, p in enumerate(proteins)))
    (tmp_path / "b.faa").write_text("".join(f">p{i}\n{p}\n" for i, p in enumerate(proteins)))
    (tmp_path / "ok.tsv").write_text("c1\t+p0;-p1;+p2\nc2\t+p3;+p4;-p5\n")
    (tmp_path / "missing.tsv").write_text("c1\t+p0;-p1\nc2\t+p3;+p9\n")
    other = tmp_path / "other_store"
    from glm_jax.proteins import embed as protein_embed
    protein_embed.EmbeddingStore(other, model={"fingerprint": "another", "config": {}, "layer": 1, "dim": 32,
                                               "compute_dtype": "float32", "max_residues": 12_288, "source": "x"})
    cases = ((["a.faa", "--contig-table", "missing.tsv"], "missing.tsv: line 2: contig 'c2'"),
             (["a.faa", "b.faa", "--contig-table", "ok.tsv"], "b.faa: record 1 'c1': contig id already seen"),
             (["a.faa", "--contig-table", "ok.tsv", "--store", str(other)], "other_store holds embeddings of another"))
    for args, message in cases:
        args = [str(tmp_path / a) if a.endswith((".faa", ".tsv")) else a for a in args]
        store = [] if "--store" in args else ["--store", str(setup["common"]["store_dir"])]
        code = cli.main(["infer", *args, "--checkpoint", str(setup["root"] / "model"), "--output",
                         str(tmp_path / "out"), *store, "--esm2-model", str(setup["esm2"]), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out").exists()
