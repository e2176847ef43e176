"""The benchmarks' PNGs: drawn from their result JSON, beside it, where matplotlib is installed (the GPU box
has it; here `--plot RESULT.json` draws them later)."""

from collections.abc import Callable
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_beside(figure, result_file: Path) -> Path:
    figure.tight_layout()
    png = result_file.with_suffix(".png")
    figure.savefig(png, dpi=120)
    return png


def draw_if_possible(plot: Callable[[Path], Path], result_file: Path, module: str) -> None:
    try:
        print(plot(result_file))
    except ImportError:
        print(f"matplotlib is not installed here: python -m {module} --plot {result_file}")
