"""How distilflow's modules depend on each other: no circle, and the config stands without the tasks."""

import ast
import graphlib
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("configs", "tasks", "flows")


def imports_of(module: str) -> set[str]:
    """The distilflow modules ``module`` imports, at its top or inside a function."""
    package, name = module.split(".")[1:]
    imported = set()
    for node in ast.walk(ast.parse((REPO / package / f"{name}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distilflow."):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    return imported


def test_no_module_imports_itself_through_others():
    modules = {f"distilflow.{package}.{path.stem}" for package in PACKAGES for path in (REPO / package).glob("*.py")}
    graph = {module: (imports_of(module) & modules) - {module} for module in modules}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the circle


def test_a_config_with_a_python_check_validates_without_the_tasks_package():
    script = ("import sys\n"
              "from distilflow.configs.schema import TaskConfig\n"
              "TaskConfig.model_validate({'data': 'configs/data/support_tickets.jsonl', 'check': {'type': 'python',"
              " 'function': 'json:loads'}}, context={'base_dir': '.'})\n"
              "print(sorted(m for m in sys.modules if m.startswith('distilflow.tasks')))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("argv, named", [
    (["run", "no-such-config.yaml"], "no-such-config.yaml"),
    (["validate", "no-such-config.yaml"], "no-such-config.yaml"),
    (["run", "configs/tiny.yaml", "--set", f"run.workdir={REPO / 'pyproject.toml' / 'work'}"], "pyproject.toml"),
    (["validate", "configs/tiny.yaml", "--set", f"run.workdir={REPO / 'pyproject.toml' / 'work'}"], "pyproject.toml"),
], ids=["run-no-config", "validate-no-config", "run-workdir-under-a-file", "validate-workdir-under-a-file"])
def test_a_config_or_a_place_the_cli_cannot_use_is_named_before_the_ml_stack_is_imported(argv, named):
    """`distilflow run` and `validate` load the config and check its files and stores before they import Prefect's
    flow and the stages: a typo in a path costs a fraction of a second, not the ~10 s of torch, transformers and
    MLflow."""
    script = ("import sys\n"
              "from distilflow.flows.cli import main\n"
              f"code = main({argv!r})\n"
              "print(code, sorted({'torch', 'transformers', 'mlflow', 'prefect'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []", done.stderr
    assert named in done.stderr
