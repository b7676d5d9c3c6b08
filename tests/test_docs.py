"""The README and docs/ pages: short README, every Python block executed by a test, every
relative link pointing at a file (and heading) that exists, the Layout sections matching the
package's files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))

# Every ```python block of every page, and the test that runs it: README's one in
# test_readme.py; the docs' in test_examples.py, page by page in this order, in one scope
# (a later page may use an earlier page's names). Adding a block means running it there.
EXECUTED = {"README.md": 1, "docs/algorithms.md": 3, "docs/guide.md": 1}


def python_blocks(page: Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def _rel(page: Path) -> str:
  return page.relative_to(ROOT).as_posix()


def test_readme_is_short_and_its_first_python_example_is_on_the_first_screen():
  lines = README.read_text(encoding="utf-8").splitlines()
  assert len(lines) <= 250, f"README.md has {len(lines)} lines: move detail to docs/"
  first = next(i for i, line in enumerate(lines, 1) if line.startswith("```python"))
  assert first <= 80, f"README's first Python example starts at line {first}"
  for page in PAGES[1:]:
    assert f"({_rel(page)}" in README.read_text(encoding="utf-8"), f"README never links {page.name}"


def test_readme_keeps_the_two_commands():
  """`.ci/run` is `make test`, the README's test command; `make demo` is the demo."""
  text = README.read_text(encoding="utf-8")
  block = re.search(r"## Two commands\n\n```bash\n(.*?)```", text, re.S)
  assert block, "README lost its '## Two commands' bash block"
  assert [line.split("#")[0].strip() for line in block.group(1).splitlines()] == [
      "make demo", "make test"]
  assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_python_block_is_executed_by_a_test():
  found = {_rel(p): len(python_blocks(p)) for p in PAGES if python_blocks(p)}
  assert found == EXECUTED, "a Python block was added, moved or removed: update EXECUTED " \
                            "and the test that runs it (test_examples.py)"


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
  seen: dict[str, int] = {}
  anchors = set()
  for heading in re.findall(r"^#+ (.+)$", _outside_code(page), re.M):
    slug = _slug(heading)
    anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


def _outside_code(page: Path) -> str:
  return re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_every_relative_link_points_at_an_existing_file_and_heading():
  broken = []
  for page in PAGES:
    for target in re.findall(r"\]\(([^)\s]+)\)", _outside_code(page)):
      if re.match(r"[a-z]+:", target):
        continue  # http(s), mailto
      path, _, anchor = target.partition("#")
      dest = (page.parent / path).resolve() if path else page
      if not dest.exists():
        broken.append(f"{_rel(page)}: {target} (no such file)")
      elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        broken.append(f"{_rel(page)}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def _layout_block(page: Path) -> str:
  text = page.read_text(encoding="utf-8")
  match = re.search(r"^## Layout\n.*?```\n(.*?)```", text, re.S | re.M)
  assert match, f"{page.name} has no '## Layout' section with a code block"
  return match.group(1)


def _listed_paths(block: str) -> set[str]:
  """The paths a layout tree names: one entry a line, folders ending in '/', nesting by
  indentation; the description after the name is free text."""
  stack: list[tuple[int, str]] = []
  paths = set()
  for line in block.splitlines():
    match = re.match(r"^( *)(\S+)", line)
    if not match or not (match.group(2).endswith("/") or match.group(2).endswith(".py")):
      continue
    indent, name = len(match.group(1)), match.group(2)
    while stack and stack[-1][0] >= indent:
      stack.pop()
    path = "".join(s for _, s in stack) + name
    paths.add(path)
    if name.endswith("/"):
      stack.append((indent, name))
  return paths


def _package_modules() -> set[str]:
  return {p.relative_to(ROOT).as_posix() for p in (ROOT / "tracefl_jax").rglob("*.py")
          if p.name != "__init__.py" and "__pycache__" not in p.parts}


def test_guide_layout_lists_every_module_and_nothing_else():
  listed = _listed_paths(_layout_block(ROOT / "docs" / "guide.md"))
  modules = {p for p in listed if p.endswith(".py") and not p.endswith("__init__.py")}
  live = _package_modules()
  assert not live - modules, f"modules missing from docs/guide.md's Layout: {sorted(live - modules)}"
  assert not modules - live, f"docs/guide.md's Layout names modules that do not exist: " \
                             f"{sorted(modules - live)}"
  missing = sorted(p for p in listed if not (ROOT / p).exists())
  assert not missing, f"docs/guide.md's Layout names paths that do not exist: {missing}"


def test_readme_layout_lists_every_subpackage_and_nothing_else():
  listed = _listed_paths(_layout_block(README))
  packages = {p for p in listed if p.startswith("tracefl_jax/") and p != "tracefl_jax/"}
  live = {f"tracefl_jax/{Path(m).parts[1]}/" for m in _package_modules()
          if len(Path(m).parts) > 2}
  assert packages == live, f"README's Layout: missing {sorted(live - packages)}, " \
                           f"not there {sorted(packages - live)}"
  missing = sorted(p for p in listed if not (ROOT / p).exists())
  assert not missing, f"README's Layout names paths that do not exist: {missing}"


def _module_exists(dotted: str) -> bool:
  """`tracefl_jax.a.b.name`: some prefix is a module file (the rest names inside it), a
  package whose __init__ names the rest, or the whole is a package."""
  path = ROOT
  for part in dotted.split("."):
    if (path / f"{part}.py").exists():
      return True
    if not (path / part).is_dir():
      init = path / "__init__.py"
      return init.exists() and re.search(rf"\b{part}\b", init.read_text(encoding="utf-8"))
    path = path / part
  return True


def test_every_file_and_module_the_pages_name_exists():
  """Paths such as `provenance/removal.py` or `benchmarks/bench_round.py` (from the repository
  or from tracefl_jax/) and modules such as `tracefl_jax.experiment.stored`: modules are
  being moved, and a page must move with them."""
  missing = []
  for page in PAGES:
    text = page.read_text(encoding="utf-8")
    for path in set(re.findall(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\.py)\b", text)):
      if not ((ROOT / path).exists() or (ROOT / "tracefl_jax" / path).exists()):
        missing.append(f"{_rel(page)}: {path}")
    for dotted in set(re.findall(r"\b(tracefl_jax(?:\.\w+)+)", text)):
      if not _module_exists(dotted):
        missing.append(f"{_rel(page)}: {dotted}")
  assert not missing, "\n".join(sorted(missing))
