"""docs/simulator.md's conformance table: every row names a public source and tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "simulator.md"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def table_rows() -> list[list[str]]:
    """The cells of each row of the table under ``## Conformance table``."""
    text = DOC.read_text()
    section = text.split("## Conformance table", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| rule | source | test |"), rows[0]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")}


def test_every_row_names_a_source_and_tests_that_exist() -> None:
    rows = table_rows()
    assert len(rows) >= 25
    for rule, source, tests in rows:
        assert rule, "a row without a rule"
        assert "https://" in source or "(#" in source, f"no public source for: {rule}"
        refs = TEST_REF.findall(tests)
        assert refs, f"no test for: {rule}"
        for file, name in refs:
            path = ROOT / file
            assert path.is_file(), f"{file} (row: {rule}) does not exist"
            assert name in defined_tests(path), f"{file}::{name} (row: {rule}) does not exist"


def test_the_issues_rules_each_have_a_row() -> None:
    rules = " ".join(row[0] for row in table_rows())
    for topic in ("prefill", "trailing whitespace", "tool_result", "tool_use", "empty", "thinking",
                  "maximum output", "max_tokens: 0", "Extra inputs are not permitted", "lookback",
                  "minimum cacheable", "automatic caching", "workspace", "vLLM", "SGLang", "llama.cpp"):
        assert topic in rules, f"no row for {topic}"
