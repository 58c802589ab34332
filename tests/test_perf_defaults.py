"""Platform performance defaults: the huge-page allocator restart of program entry points."""
import os
import pathlib
import subprocess
import sys

import pytest

from glm_jax import perf_defaults

PROBE = """
import ctypes, os
from glm_jax.perf_defaults import restart_with_huge_pages
restart_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20  # plain malloc (numpy would madvise huge pages itself), served by mmap
ctypes.memset(libc.malloc(size), 1, size)
rollup = open("/proc/self/smaps_rollup").read().split("\\n")
huge_kb = sum(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
print(os.environ.get("GLIBC_TUNABLES"), huge_kb)
"""


def _probe(**env_changes) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", perf_defaults.HUGE_PAGES_SWITCH)}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    tunables, huge_kb = out.stdout.split()
    return tunables, int(huge_kb)


@pytest.mark.skipif(not perf_defaults.glibc_has_huge_page_tunable(), reason="needs Linux with glibc >= 2.35")
def test_restart_puts_large_buffers_on_huge_pages():
    """The restarted process has the tunable, keeps other tunables, and its large allocations
    really sit on transparent huge pages (a misspelled tunable is silently ignored by glibc)."""
    tunables, huge_kb = _probe(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert tunables == f"glibc.malloc.check=0:{perf_defaults.HUGE_PAGE_TUNABLE}"
    thp = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are disabled on this kernel")
    assert huge_kb >= 32 << 10  # at least half of the 64 MiB buffer


@pytest.mark.skipif(not perf_defaults.glibc_has_huge_page_tunable(), reason="needs Linux with glibc >= 2.35")
def test_switch_keeps_the_process_as_started():
    tunables, huge_kb = _probe(**{perf_defaults.HUGE_PAGES_SWITCH: "0"})
    assert tunables == "None" and huge_kb < 32 << 10


REUSING_PROBE = """
import ctypes, os
from glm_jax import perf_defaults
perf_defaults.restart_with_huge_pages(perf_defaults.REUSING_MALLOC_TUNABLES)

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 16 << 20  # a PyTorch-sized buffer: above glibc's default mmap threshold
mapped_before = libc.mallinfo2().hblks
buffer = libc.malloc(size)
ctypes.memset(buffer, 1, size)
mapped = libc.mallinfo2().hblks - mapped_before  # 1 when glibc mmapped it
libc.free(buffer)
kept = libc.mallinfo2().arena >= size  # False when glibc trimmed the heap after the free
print(os.environ.get("GLIBC_TUNABLES"), mapped, kept)
"""


@pytest.mark.skipif(not perf_defaults.glibc_has_huge_page_tunable(), reason="needs Linux with glibc >= 2.35")
def test_benchmark_restart_adds_the_malloc_limits_it_misses():
    """benchmarks/run.py's restart: every tunable it asks for, once, after the ones already set (a
    process started with only the huge-page tunable, as the CLI leaves it, restarts too), and glibc
    obeys them: a 16 MiB buffer comes from the heap, not a fresh mmap, and stays there after free
    (a misspelled tunable is silently ignored by glibc, so its effect is checked)."""
    env = {k: v for k, v in os.environ.items() if k != perf_defaults.HUGE_PAGES_SWITCH}
    for started_with in ("glibc.malloc.check=0", perf_defaults.HUGE_PAGE_TUNABLE):
        out = subprocess.run([sys.executable, "-c", REUSING_PROBE], env=dict(env, GLIBC_TUNABLES=started_with),
                             capture_output=True, text=True, check=True)
        tunables, mapped, kept = out.stdout.split()
        assert (mapped, kept) == ("0", "True")
        tunables = tunables.split(":")
        assert tunables[0] == started_with and sorted(tunables[1:]) == sorted(
            {perf_defaults.HUGE_PAGE_TUNABLE, *perf_defaults.REUSING_MALLOC_TUNABLES} - {started_with})


CACHE_PROBE = """
import logging, os, sys
if os.environ.get("HIDE_FILELOCK"):
    sys.modules["filelock"] = None  # as if not installed
from glm_jax.perf_defaults import enable_compilation_cache
print(enable_compilation_cache())
import jax, jax.numpy as jnp, numpy as np
logging.basicConfig(level=logging.WARNING)
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
print(np.abs(np.asarray(jax.jit(lambda a: jnp.tanh(a @ a.T))(x)) - np.tanh(x @ x.T)).max())
"""


def _cache_probe(tmp_path, **env_changes):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update({"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XDG_CACHE_HOME": str(tmp_path / "xdg"),
                **env_changes})
    done = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True)
    folder, max_error = done.stdout.split()
    return folder, float(max_error), "Persistent compilation cache hit" in done.stderr


def test_compilation_cache_is_written_then_read_and_gives_the_same_results(tmp_path):
    """The first process compiles and writes the cache (under XDG_CACHE_HOME); the second loads the
    executable instead of compiling, and it still computes tanh(x x^T) as numpy does."""
    first = _cache_probe(tmp_path)
    assert first[0] == str(tmp_path / "xdg" / "glm-jax" / "xla-compilation-cache") and not first[2]
    assert list(pathlib.Path(first[0]).iterdir())
    second = _cache_probe(tmp_path)
    assert second[2] and second[1] == first[1] and first[1] < 1e-5


def test_compilation_cache_works_without_filelock(tmp_path):
    """jax refuses a cache size cap without the filelock package and then caches nothing (seen on
    jax 0.11.2 in an environment without transformers/torch): no cap there, but a working cache."""
    first = _cache_probe(tmp_path, HIDE_FILELOCK="1")
    assert list(pathlib.Path(first[0]).iterdir()) and not first[2]
    assert _cache_probe(tmp_path, HIDE_FILELOCK="1")[2]


def test_compilation_cache_switches(tmp_path):
    assert _cache_probe(tmp_path, **{perf_defaults.COMPILATION_CACHE_SWITCH: "0"})[0] == "None"
    assert not (tmp_path / "xdg").exists()
    chosen = tmp_path / "mine"
    assert _cache_probe(tmp_path, **{perf_defaults.COMPILATION_CACHE_SWITCH: str(chosen)})[0] == str(chosen)
    assert _cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))[0] == "None"
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    assert _cache_probe(tmp_path, **{perf_defaults.COMPILATION_CACHE_SWITCH: str(unwritable / "sub")})[0] == "None"


def test_the_glm_jax_program_turns_the_cache_on(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "GLM_JAX_COMP"))}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    subprocess.run([sys.executable, "-m", "glm_jax.cli", "--help"], env=env, capture_output=True, check=True)
    assert (tmp_path / "glm-jax" / "xla-compilation-cache").is_dir()
