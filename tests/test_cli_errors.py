"""Every `glm-jax` command on malformed, empty, truncated and mismatched input: a non-zero exit,
exactly one stderr line `glm-jax COMMAND: error: ...` naming the file / record / tensor / field at
fault, no traceback, and no output left behind. Commands run in-process through
`glm_jax.cli.main.main`; two run as real processes for the exit status and stderr of the shell."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from glm_jax.cli import main as cli
from glm_jax.data import make_shards, shards
from glm_jax.interop import convert
from glm_jax.model import checkpoint
from glm_jax.model.glm import GLMConfig, create_model
from helpers import fails

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = GLMConfig(emb_dim=9, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                   max_position_embeddings=8, max_genes=8, num_pc=5)
GENBANK = """LOCUS       ctg1                     120 bp    DNA     linear   UNK 01-JAN-1980
FEATURES             Location/Qualifiers
     source          1..120
     CDS             1..30
                     /translation="MKVLA"
     CDS             complement(40..70)
                     /translation="MAAKV"
     CDS             80..110
                     /translation="MKKLV"
ORIGIN
        1 atgaaagtac tggcataaat gaaagtactg gcataaatga aagtactggc ataaatgaaa
       61 gtactggcat aaatgaaagt actggcataa atgaaagtac tggcataaat gaaagtactg
//
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the cases: a tiny model directory, its original-layout state dict, batches."""
    root = tmp_path_factory.mktemp("cli_inputs")
    model = create_model(CONFIG, seed=0)
    checkpoint.save_model(root / "model", model)
    state_dict = convert.params_to_torch(checkpoint.params_as_dict(model), CONFIG)
    wrong = dict(state_dict)
    wrong["roberta.roberta.encoder.layer.1.intermediate.dense.weight"] = np.zeros((33, 16), np.float32)
    convert.write_state_dict(root / "one_wrong.bin", wrong)
    (root / "text.bin").write_text("not a state dict\n")
    good = {"inputs_embeds": np.zeros((2, 6, 9), np.float32), "attention_mask": np.ones((2, 6), np.float32)}
    np.savez(root / "good.npz", **good)
    np.savez(root / "wide.npz", **dict(good, inputs_embeds=np.zeros((2, 6, 10), np.float32)))
    with_nan = good["inputs_embeds"].copy()
    with_nan[1, 2, 4] = np.nan
    np.savez(root / "nan.npz", **dict(good, inputs_embeds=with_nan))
    np.savez(root / "no_mask.npz", inputs_embeds=good["inputs_embeds"])
    (root / "text.npz").write_text("inputs_embeds\n")
    (root / "a_file").write_text("")
    return root


def test_forward_names_the_file_and_the_array(files, tmp_path, capsys):
    out = tmp_path / "out.npz"
    run = ("forward", "--checkpoint", files / "model", "--output", out, "--input")
    line = fails(capsys, *run, files / "wide.npz")
    assert "wide.npz" in line and "inputs_embeds must be [batch, genes, 9]" in line and "got [2, 6, 10]" in line
    line = fails(capsys, *run, files / "nan.npz")
    assert "nan.npz" in line and "NaN" in line and "[[1, 2]]" in line
    line = fails(capsys, *run, files / "no_mask.npz")
    assert "no_mask.npz" in line and "attention_mask" in line
    assert "text.npz: not an .npz file" in fails(capsys, *run, files / "text.npz")
    assert "input not found" in fails(capsys, *run, files / "absent.npz")
    line = fails(capsys, "forward", "--checkpoint", tmp_path / "no_model", "--input", files / "good.npz", "--output", out)
    assert "checkpoint not found" in line and "no_model" in line
    line = fails(capsys, "forward", "--checkpoint", files, "--input", files / "good.npz", "--output", out)
    assert "is not a glm-jax model directory" in line
    # an output under a plain file: refused before the model runs
    line = fails(capsys, "forward", "--checkpoint", files / "model", "--input", files / "good.npz",
                 "--output", files / "a_file" / "out.npz")
    assert "a_file" in line and "not a directory" in line
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_any_work(files, tmp_path, capsys):
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    line = fails(capsys, "forward", "--checkpoint", files / "model", "--input", files / "good.npz",
                 "--output", folder / "out.npz")
    assert "read_only" in line and "not writable" in line


def test_convert_torch_names_the_one_wrongly_shaped_tensor(files, tmp_path, capsys):
    destination = tmp_path / "converted"
    line = fails(capsys, "convert-torch", files / "one_wrong.bin", destination)
    assert "roberta.roberta.encoder.layer.1.intermediate.dense.weight" in line and "(33, 16)" in line
    assert "layer.0." not in line  # only the bad tensor is named
    assert "text.bin" in fails(capsys, "convert-torch", files / "text.bin", destination, code=None)
    assert "state dict not found" in fails(capsys, "convert-torch", tmp_path / "glm.bin", destination)
    line = fails(capsys, "convert-torch", files / "one_wrong.bin", destination, "--config",
                 f"{REPO}/configs/tiny.py", "--config.model.hiden_size=3")
    assert "'model.hiden_size'" in line and "did you mean 'model.hidden_size'" in line
    assert not destination.exists()


def test_export_torch_errors(files, tmp_path, capsys):
    line = fails(capsys, "export-torch", tmp_path / "absent_model", tmp_path / "out.bin")
    assert "absent_model" in line
    line = fails(capsys, "export-torch", files / "model", files / "a_file" / "out.bin")
    assert "a_file" in line
    assert not list(tmp_path.iterdir())


def test_train_errors_leave_no_workdir(files, tmp_path, capsys):
    run = ("train", "--config", f"{REPO}/configs/tiny.py", "--workdir", tmp_path / "run")
    line = fails(capsys, *run, "--config.model.hiden_size=3")
    assert "--config.model.hiden_size" in line and "did you mean 'model.hidden_size'" in line
    line = fails(capsys, *run, "--config.train.num_steps=ten")
    assert "--config.train.num_steps" in line and "'ten'" in line
    line = fails(capsys, *run, f"--config.data.train_pattern={tmp_path}/nothing-*.tfrecord")
    assert "no shard files match" in line and "nothing-*" in line
    assert "config file not found: nope.py" in fails(capsys, "train", "--config", "nope.py", "--workdir", tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name, content, expected", [
    ("empty.gb", "", "no genbank records"),
    ("cut.gb", GENBANK[:300], "malformed genbank record 1"),
    ("cut.gb.gz", gzip.compress(GENBANK.encode())[:60], "malformed genbank record 1"),
    ("digits.gb", GENBANK.replace("MKVLA", "MK1%A"), "CDS 'ctg1_cds1': invalid residue '1' at position 3"),
    ("columns.gff3", "##gff-version 3\nctg1\tx\tCDS\t1\n", "line 2: expected 9 tab-separated GFF3 columns"),
    ("empty.gff3", "", "no ##FASTA section"),
    ("three_genes.gb", GENBANK, "every contig has fewer than 16 genes"),
])
def test_make_shards_names_the_genome_and_writes_nothing(tmp_path, capsys, name, content, expected):
    genome = tmp_path / name
    genome.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = fails(capsys, "make-shards", genome, "--out", tmp_path / "dataset", "--esm2", tmp_path / "no_esm2",
                 "--no-progress")
    assert name in line and expected in line
    assert not (tmp_path / "dataset").exists()


def test_make_shards_contig_table_errors(tmp_path, capsys):
    (tmp_path / "p.faa").write_text(">a\nMKV\n")
    (tmp_path / "empty.tsv").write_text("")
    run = ("make-shards", tmp_path / "p.faa", "--out", tmp_path / "dataset", "--no-progress", "--contig-table")
    assert "empty.tsv: empty contig table" in fails(capsys, *run, tmp_path / "empty.tsv")
    assert "genome file not found" in fails(capsys, "make-shards", tmp_path / "x.gb", "--out", tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()


class FakeStore:
    """Stands in for ESM2 + store: a fixed pseudo-random 4-d embedding per protein."""

    def __call__(self, sequences):
        return self

    def get(self, sequences):
        return np.stack([np.random.default_rng(list(s.encode())).normal(size=4) for s in sequences]).astype(np.float16)


def test_a_failed_rerun_never_leaves_a_dataset_that_looks_complete(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(make_shards, "esm2_embedder", lambda *args, **kwargs: (FakeStore(), {}))
    genome, out = tmp_path / "g.gb", tmp_path / "dataset"
    genome.write_text(GENBANK)
    run = ("make-shards", genome, "--out", out, "--window", "3", "--min-genes", "1", "--num-components", "2",
           "--num-shards", "1", "--eval-fraction", "0", "--no-progress")
    assert cli.main([str(a) for a in run]) == 0
    assert shards.load_dataset_info(out)["splits"]["train"]["num_windows"] == 1
    capsys.readouterr()
    np.savez(tmp_path / "norm.npz", mean=np.zeros(5), std=np.ones(5), pca_components=np.eye(2, 5),
             pca_mean=np.zeros(5), pca_explained_variance=np.ones(2))
    line = fails(capsys, *run, "--normalization", tmp_path / "norm.npz")
    assert "embeddings are 4-d but the normalisation is 5-d" in line
    assert not (out / shards.INFO_FILE).exists()  # the old dataset is no longer marked complete
    line = fails(capsys, "embed", "--checkpoint", files / "model", "--shards", out, "--output", tmp_path / "genes.npz")
    assert "dataset: no dataset_info.json: not a make-shards output, or one that did not finish" in line


def test_embed_proteins_refuses_unknown_residues_unless_asked(tiny_esm2_dir, tmp_path, capsys):
    fasta = tmp_path / "p.fa"
    fasta.write_text(">a\nMKTAYIAK\n>b some protein\nMK1%A\n")
    store = tmp_path / "store"
    run = ("embed-proteins", fasta, "--store", store, "--model", tiny_esm2_dir, "--quiet")
    line = fails(capsys, *run)
    assert "p.fa: record 'b' (line 3): invalid residue '1' at position 3" in line and "--map-unknown-to-x" in line
    assert not store.exists()
    assert cli.main([str(a) for a in run] + ["--map-unknown-to-x"]) == 0
    from glm_jax.proteins.embed import EmbeddingStore
    assert "MKXXA" in EmbeddingStore(store) and "MK1%A" not in EmbeddingStore(store)
    capsys.readouterr()
    (tmp_path / "empty.fa").write_text("")
    assert "empty.fa: no FASTA records" in fails(capsys, "embed-proteins", tmp_path / "empty.fa", "--store", store)
    line = fails(capsys, "embed-proteins", fasta, "--store", tmp_path / "s2", "--model", tmp_path / "no_model",
                 "--map-unknown-to-x")
    assert "no_model" in line


def test_fit_normalization_and_embed_errors(files, tmp_path, capsys):
    line = fails(capsys, "fit-normalization", "--embeddings", files / "good.npz", "--out", tmp_path / "n.npz")
    assert "good.npz has no array 'embs'" in line
    line = fails(capsys, "fit-normalization", "--embeddings", tmp_path / "absent.npz", "--out", tmp_path / "n.npz")
    assert "absent.npz" in line
    line = fails(capsys, "embed", "--checkpoint", files / "model", "--shards", f"{tmp_path}/nothing-*.tfrecord",
                 "--output", tmp_path / "genes.npz")
    assert "no shard files match" in line and "nothing-*" in line
    assert not list(tmp_path.iterdir())


def test_fetch_esm2_into_an_impossible_folder(files, capsys):
    line = fails(capsys, "fetch-esm2", "--dest", files / "a_file" / "esm2")
    assert "a_file" in line


def boom_main(argv):
    if argv == ["interrupt"]:
        raise KeyboardInterrupt
    raise ZeroDivisionError("a bug\nover two lines")


def test_dispatcher_exit_codes_and_debug(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "boom", (__name__, "boom_main", "raises"))
    assert fails(capsys, "boom", code=1) == ("glm-jax boom: error: ZeroDivisionError: a bug over two lines "
                                              "(run with --debug for the traceback)")
    assert cli.main(["boom", "interrupt"]) == 130
    assert capsys.readouterr().err == "glm-jax boom: interrupted\n"
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "boom"])
    monkeypatch.setenv("GLM_JAX_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["boom"])
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err
    assert cli.main(["forward", "--no-such-option"]) == 2  # argparse's own usage error
    assert "glm-jax forward: error: the following arguments are required" in capsys.readouterr().err


def test_real_process_exit_status_and_stderr(tmp_path):
    """`python -m glm_jax.cli` as a user runs it: exit status 2, one stderr line; --debug shows the traceback."""
    (tmp_path / "empty.gb").write_text("")
    argv = [sys.executable, "-m", "glm_jax.cli", "make-shards", str(tmp_path / "empty.gb"), "--out", str(tmp_path / "d")]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"glm-jax make-shards: error: {tmp_path / 'empty.gb'}: no genbank records found\n"
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "GenomeFormatError" in debug.stderr
    assert not (tmp_path / "d").exists()


def test_progress_lines_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    from glm_jax import progress
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    bar = progress.Progress(total=100, desc="ESM2", unit="protein", terminal=False)
    for seconds, done in ((10, 10), (40, 30), (50, 60)):
        now[0] = seconds
        bar.update(done)
    bar.close()
    assert capsys.readouterr().err.splitlines() == [
        "ESM2: 40/100 proteins (1 proteins/s, 0:40 elapsed, ETA 1:00)",
        "ESM2: 100/100 proteins (2 proteins/s, 0:50 elapsed, ETA 0:00)"]
    for enabled in (True, False):  # a short stage, and --no-progress, print nothing
        with progress.Progress(total=5, desc="x", terminal=False, enabled=enabled) as quiet:
            now[0] += 10 if enabled else 100
            quiet.update(5)
    assert capsys.readouterr().err == ""
