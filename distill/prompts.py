"""Prompt sources for data-free distillation (DMD/ODE need prompts, not videos).

Accepted: a text file (one prompt per line), a folder of `.txt` files (one prompt each), a `datasets` folder
written by `save_to_disk`, or a json/jsonl/csv/parquet/arrow file read with `datasets` (column `prompt`).
"""

from __future__ import annotations

from pathlib import Path

DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_prompts(path: str | Path, column: str = "prompt") -> list[str]:
    """All non-empty prompts of a source, in order; errors name the path and the accepted layouts."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt source not found: {path} (expected a .txt file, a folder of .txt files, "
                                f"a datasets folder, or a json/jsonl/csv/parquet/arrow file)")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            import datasets

            prompts = _column(datasets.load_from_disk(str(path)), column, path)
        else:
            prompts = [f.read_text().strip() for f in sorted(path.glob("*.txt"))]
    elif path.suffix in DATASET_SUFFIXES:
        import datasets

        ds = datasets.load_dataset(DATASET_SUFFIXES[path.suffix], data_files=str(path), split="train")
        prompts = _column(ds, column, path)
    else:
        prompts = path.read_text().splitlines()
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _column(ds, column: str, path: Path) -> list[str]:
    if column not in ds.column_names:
        raise ValueError(f"{path}: no column {column!r}; columns are {ds.column_names}")
    return list(ds[column])
