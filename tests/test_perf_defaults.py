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
