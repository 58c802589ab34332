"""Contig windows: the original's segmentation rule, the stride/min-genes options and the report."""
import pytest

from glm_jax.data.genomes import Contig, Gene, read_genome
from glm_jax.data.windows import WindowConfig, contig_windows, segment_bounds


def original_rule(n, size=30):
    """The behaviour of gLM's contigs_to_prots, restated: n // size + 1 consecutive segments of
    `size`, the last one holding the remainder; a segment is kept when it has > size / 2 genes."""
    kept = []
    for i in range(n // size + 1):
        stop = n if i == n // size else (i + 1) * size
        if stop - i * size > size / 2:
            kept.append((i, i * size, stop))
    return kept


def contig(n, name="c"):
    return Contig(name, "g.gbk", tuple(Gene(f"{name}{i}", "MK", 1, i * 10 + 1, i * 10 + 9, name, i + 1) for i in range(n)))


@pytest.mark.parametrize("size", [30, 10, 7])
def test_default_is_the_original_rule(size):
    for n in range(0, 8 * size):
        windows, _ = contig_windows([contig(n)], WindowConfig(size))
        assert [(w.index, w.start, w.start + len(w.genes)) for w in windows] == original_rule(n, size), n
        assert all(w.id == f"c_{w.index}" for w in windows)


def test_report_counts_dropped_segments():
    windows, report = contig_windows([contig(45, "a"), contig(10, "b"), contig(60, "c"), contig(0, "d")])
    assert [w.id for w in windows] == ["a_0", "c_0", "c_1"]  # a_1 has 15 genes: not > 15
    assert report.short_segments == 2 and report.genes_not_covered == 15 + 10
    assert report.contigs_without_window == ["g.gbk:b (10 genes)", "g.gbk:d (0 genes)"]
    assert report.summary()["windows"] == 3 and report.genes_in_windows == 90


def test_stride_and_min_genes():
    config = WindowConfig(size=30, min_genes=10, stride=10)
    assert segment_bounds(55, config) == [(0, 30), (10, 40), (20, 50), (30, 55)]  # stops at the first window reaching the end
    windows, report = contig_windows([contig(55)], config)
    assert len(windows) == 4 and report.genes_not_covered == 0
    assert [g.id for g in windows[1].genes] == [f"c{i}" for i in range(10, 40)]
    assert segment_bounds(12, WindowConfig(30, min_genes=12)) == [(0, 12)]
    assert len(contig_windows([contig(12)], WindowConfig(30, min_genes=12))[0]) == 1
    with pytest.raises(ValueError):
        WindowConfig(size=30, stride=31)
    with pytest.raises(ValueError):
        WindowConfig(size=30, min_genes=0)


def test_real_genomes(shared_data):
    ecoli = read_genome(shared_data / "ecoli/GCF_000005845.2_ASM584v2_genomic.gbff.gz")
    windows, report = contig_windows(ecoli.contigs)
    # 4,298 genes = 143 windows of 30 + a remainder of 8 (dropped); CDS 1-60 are the reference contigs
    assert len(windows) == 143 and report.genes_not_covered == 8 and report.short_segments == 1
    assert [g.index for g in windows[1].genes] == list(range(31, 61))
    yersinia = read_genome(shared_data / "genomes/Yersinia_pestis_KIM.gb.gz")
    windows, _ = contig_windows(yersinia.contigs)
    expected = sum(len(original_rule(len(c.genes))) for c in yersinia.contigs)
    assert len(windows) == expected
    assert all(len({g.contig for g in w.genes}) == 1 for w in windows)
