"""tests/RELIABILITY.md stays true: every test a row names exists, and every row names one."""

import ast
import re

from tests.conftest import REPO

TABLE = REPO / "tests" / "RELIABILITY.md"
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def functions_in(path) -> set[str]:
    tree = ast.parse((REPO / path).read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_test_the_table_names_exists():
    references = TEST_REFERENCE.findall(TABLE.read_text())
    assert len(references) > 50
    missing = [f"{path}::{name}" for path, name in references
               if not (REPO / path).is_file() or name not in functions_in(path)]
    assert missing == []


def test_every_row_of_the_table_names_a_test():
    rows = [line for line in TABLE.read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| #", "|---"))]
    assert [row for row in rows if "same test" not in row and not TEST_REFERENCE.search(row)] == []
