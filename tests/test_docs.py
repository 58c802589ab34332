"""The documentation is checked, not trusted: the mkdocs site builds in strict mode (a broken link
or anchor fails), the CLI reference is what the parsers print, the API page lists every public
name, every command block of getting-started names a test that exists and runs those commands, and
the README's links resolve. The generated benchmark tables are checked by tests/test_benchmarks.py
(`benchmarks/run.py report --check`)."""
import ast
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
COVERED_BY = re.compile(r"<!--\s*covered-by:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# a relative Markdown link or image target: [text](target) / ![alt](target)
LINK = re.compile(r"\]\(([^)\s]+)\)")

BUILD = """
import logging
import sys
logging.basicConfig(format="%(levelname)s %(message)s")  # the warnings that strict mode counts
from mkdocs.commands.build import build
from mkdocs.config import load_config
from mkdocs.exceptions import Abort
try:
    build(load_config(config_file=sys.argv[1], docs_dir=sys.argv[2], site_dir=sys.argv[3], strict=True))
except Abort as error:
    print(error, file=sys.stderr)
    sys.exit(1)
"""


def mkdocs_build(docs_dir: pathlib.Path, site_dir: pathlib.Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of mkdocs.yml with another docs folder, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-c", BUILD, str(REPO / "mkdocs.yml"), str(docs_dir), str(site_dir)],
                          cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(site_dir.parent)})


needs_mkdocs = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None
                                  or importlib.util.find_spec("mkdocstrings") is None,
                                  reason="mkdocs is not installed: pip install -e '.[docs]'")


@needs_mkdocs
def test_site_builds_strictly_and_a_broken_link_fails_it(tmp_path):
    built = mkdocs_build(DOCS, tmp_path / "site")
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("glm_jax.") > 20  # mkdocstrings ran

    broken = tmp_path / "docs"
    shutil.copytree(DOCS, broken, ignore=shutil.ignore_patterns("img"))
    (broken / "img").mkdir()
    for image in DOCS.glob("img/**/*.png"):  # same tree, empty files: links resolve, copying stays cheap
        (broken / image.relative_to(DOCS)).parent.mkdir(parents=True, exist_ok=True)
        (broken / image.relative_to(DOCS)).touch()
    with open(broken / "index.md", "a") as page:
        page.write("\nSee [the missing page](no-such-page.md).\n")
    failed = mkdocs_build(broken, tmp_path / "site2")
    assert failed.returncode != 0 and "no-such-page.md" in failed.stdout + failed.stderr


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_what_the_parsers_print(tmp_path, capsys):
    gen_cli = _gen_cli()
    assert gen_cli.main(["--check"]) == 0, "docs/cli.md is stale: python docs/gen_cli.py"
    from glm_jax.cli.main import COMMANDS

    page = (DOCS / "cli.md").read_text()
    assert all(f"\n## {name}\n" in page for name in COMMANDS)
    assert "### operons fit" in page and "usage: glm-jax operons fit" in page  # subcommands too
    stale = tmp_path / "cli.md"
    stale.write_text(page.replace("--workdir WORKDIR", "--work-dir WORKDIR"))
    assert gen_cli.main(["--check", "--output", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err


def test_api_page_documents_every_public_name():
    import glm_jax

    page = (DOCS / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)$", page, re.M))
    expected = {f"{module}.{name}" for name, module in glm_jax._EXPORTS.items()}
    assert expected - documented == set(), "add them to docs/api.md"
    assert documented - expected == set(), "docs/api.md names objects glm_jax does not export"


def _test_function_source(reference: str) -> tuple[str, str]:
    """`tests/x.py::test_y` -> (the function's source, the file's source); a file alone -> ('', file)."""
    path, _, name = reference.partition("::")
    file = REPO / path
    assert file.is_file(), f"covered-by: {path} does not exist"
    source = file.read_text()
    if not name:
        return "", source
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node), source
    raise AssertionError(f"covered-by: {path} has no test {name!r}")


def test_every_getting_started_command_names_a_test_that_runs_it():
    """Each code block is preceded by `<!-- covered-by: tests/FILE.py::TEST ... -->` (or a script
    such as .ci/run); each `glm-jax COMMAND` of the block is run by one of the named tests, and each
    name a Python block imports from glm_jax is used in the named test's file."""
    text = (DOCS / "getting-started.md").read_text()
    blocks = list(FENCE.finditer(text))
    assert len(blocks) >= 8
    for block in blocks:
        before = text[:block.start()].rstrip().splitlines()[-1]
        covered = COVERED_BY.fullmatch(before.strip())
        assert covered, f"getting-started.md: no covered-by comment above:\n{block.group(0)[:200]}"
        sources = [_test_function_source(ref) for ref in covered.group(1).split()]
        language, code = block.group(1), block.group(2)
        for command in re.findall(r"^\s*glm-jax ([\w-]+)", code, re.M):
            if command == "--help":
                continue
            spellings = (f'"{command}"', command.replace("-", "_"))
            assert any(s in function for function, _ in sources for s in spellings), \
                f"getting-started.md: no covering test runs `glm-jax {command}` ({covered.group(1)})"
        if language == "python":
            for names in re.findall(r"^from glm_jax import (.+)$", code, re.M):
                for name in (n.strip() for n in names.split(",")):
                    assert any(name in file for _, file in sources), f"{name} is not used by {covered.group(1)}"


def test_readme_is_short_starts_with_the_two_commands_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_commands = [line for block in FENCE.findall(text)[:2] for line in block[1].splitlines()]
    assert first_commands[0].startswith("bash launch/quickstart.sh") and first_commands[1] == "bash .ci/run"
    for target in LINK.findall(text):
        if "://" in target:
            continue
        assert (REPO / target.split("#")[0]).exists(), f"README.md links to a missing {target}"


WORK_LOG = re.compile(r"no GPU (?:has been|was) lent|earlier notes|in this session|since this session"
                      r"|until the kernels land", re.I)


def test_docs_read_as_a_manual_not_a_work_log():
    pages = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]
    found = [f"{page.relative_to(REPO)}: {match.group(0)!r}" for page in pages
             for match in WORK_LOG.finditer(page.read_text())]
    assert not found, found
