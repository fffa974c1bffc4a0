"""Where a recipe's rows come from: local files (json/jsonl/csv/parquet, globs, folders) or the hub.

`dataset_identity` is cheap (no datasets import) and feeds the format stage's fingerprint.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.recipe import Recipe
from runner.state import sha256_file

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_SLICE = re.compile(r"^(?P<split>[A-Za-z0-9_.-]+)(\[(?P<start>-?\d*%?)?:(?P<stop>-?\d*%?)?\])?$")


def _all_files(recipe: Recipe) -> list[Path] | None:
    """Every data file dataset.path names, None when it is a hub id."""
    raw = recipe.get("dataset.path")
    target = recipe.resolve(raw)
    if any(ch in raw for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(target), recursive=True))
    elif target.is_dir():
        files = sorted(p for p in target.rglob("*") if p.is_file())
    elif target.is_file():
        files = [target]
    elif raw.count("/") == 1 and not raw.startswith((".", "/", "~")) and not Path(raw).suffix:
        return None  # hub id, e.g. HasturOfficial/adgen
    else:
        raise RecipeError(
            f"{recipe.origin('dataset.path')}: $.dataset.path: {target} not found; "
            "give a local json/jsonl/csv/parquet file, folder or glob, or a hub id"
        )
    files = [f for f in files if f.suffix in BUILDERS]
    recipe.check_found("dataset.path", files)  # a link among them may lead out of the root
    if not files:
        raise RecipeError(
            f"{recipe.origin('dataset.path')}: $.dataset.path: "
            f"no .json/.jsonl/.csv/.parquet files in {target}"
        )
    kinds = {BUILDERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise RecipeError(
            f"{recipe.origin('dataset.path')}: $.dataset.path: "
            f"mixed file types ({', '.join(sorted(kinds))}); "
            "use one format per dataset"
        )
    return files


def data_name(recipe: Recipe) -> str:
    """The data as messages name it: the one file, else dataset.path as written."""
    files = _all_files(recipe)
    if files is not None and len(files) == 1:
        return str(files[0])
    return str(recipe.get("dataset.path"))


def local_files(recipe: Recipe, split: str | None = None) -> list[Path] | None:
    """The files of one split. In a folder, a split is the files named after it
    (train.jsonl, train-00001.jsonl, dev.json); a single file or a glob is the split `train`."""
    files = _all_files(recipe)
    if files is None or split is None:
        return files
    key = (
        "dataset.heldout_split"
        if split != parse_split(recipe.get("dataset.split"))[0]
        else "dataset.split"
    )
    if recipe.resolve(recipe.get("dataset.path")).is_dir():
        named = [
            f for f in files if f.stem == split or re.match(rf"^{re.escape(split)}[-_.]", f.stem)
        ]
        if not named:
            raise RecipeError(
                f"{recipe.path}: $.{key}: no file for split {split!r} in "
                f"{recipe.get('dataset.path')}; files: {', '.join(f.name for f in files)}"
            )
        return named
    if split != "train":
        raise RecipeError(
            f"{recipe.path}: $.{key}: {recipe.get('dataset.path')} is one file, the split "
            f"'train'; use heldout_rows, or point dataset.path at a folder of split files"
        )
    return files


def dataset_identity(recipe: Recipe) -> dict[str, Any]:
    """Hub id and revision, or each local file's sha256 keyed by its path relative to the recipe
    file (no absolute paths: two clones of a project get the same fingerprints)."""
    files = _all_files(recipe)
    ds = recipe.section("dataset")
    if files is None:
        return {"hub": ds["path"], "name": ds["name"], "revision": ds["revision"] or "main"}
    return {"files": {recipe.portable(ds["path"], f): sha256_file(f) for f in files}}


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
    """`train[:1%]` -> ("train", "", "1%"); `train` -> ("train", None, None)."""
    m = _SLICE.match(spec.strip())
    if not m:
        raise ValueError(f"bad split {spec!r}; write e.g. train, train[:1%] or train[100:200]")
    return m.group("split"), m.group("start"), m.group("stop")


def _bound(text: str | None, n: int) -> int | None:
    if text is None or text == "":
        return None
    value = round(n * float(text[:-1]) / 100) if text.endswith("%") else int(text)
    return value


def slice_rows(ds: Any, spec: str) -> Any:
    """Apply the slice part of a split spec to a datasets.Dataset."""
    _, start, stop = parse_split(spec)
    if start is None and stop is None:
        return ds
    n = len(ds)
    lo, hi, _ = slice(_bound(start, n), _bound(stop, n)).indices(n)
    return ds.select(range(lo, hi) if hi > lo else [])  # an empty range at the end: no rows


def load_split(recipe: Recipe, spec: str) -> Any:
    """One split of the recipe's dataset as a datasets.Dataset (no shuffling yet)."""
    import datasets

    split, _, _ = parse_split(spec)
    files = local_files(recipe, split)
    ds_cfg = recipe.section("dataset")
    for f in files or []:  # pyarrow reads bad UTF-8 silently and chokes on empty files
        # pandas pads a short CSV row with nulls: found here, not as a mystery null later
        # and a .json document of lists loads as a column named `text`: both found up front
        problem = find_bad_line(f) if f.suffix in (".csv", ".json") else check_text(f)
        if problem:
            raise RecipeError(f"{recipe.origin('dataset.path')}: $.dataset.path: {problem}")
    try:
        if files is None:
            loaded = datasets.load_dataset(
                ds_cfg["path"], ds_cfg["name"], revision=ds_cfg["revision"], split=split
            )
        else:
            builder = BUILDERS[files[0].suffix]
            # CSV cells are text as written: "007" stays 007, "NA" stays NA, empty stays empty
            as_text = _csv_as_text(files[0]) if builder == "csv" else {}
            from runner.state import cache_root

            loaded = datasets.load_dataset(
                builder,
                data_files={split: [str(f) for f in files]},
                split=split,
                # the runner's cache, not ~/.cache/huggingface: RECIPE_CACHE moves it all
                cache_dir=str(cache_root() / "datasets"),
                **as_text,
            )
    except ValueError as e:  # an unknown split, or pyarrow's ArrowInvalid for a bad line
        detail = next((d for d in map(find_bad_line, files or []) if d), None)
        if detail:
            raise RecipeError(f"{recipe.path}: $.dataset.path: {detail}") from None
        raise RecipeError(f"{recipe.path}: $.dataset.split: {e}".splitlines()[0]) from None
    except Exception as e:  # malformed files, network, unknown split: one line
        detail = _explain_load_error(files, e)
        raise RecipeError(f"{recipe.path}: $.dataset.path: {detail}") from None
    return slice_rows(loaded, spec)


def _csv_as_text(path: Path) -> dict[str, Any]:
    """load_dataset options that read every CSV column as strings, with no NA guessing."""
    import csv

    import datasets

    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), [])
    if not header or len(set(header)) != len(header):
        return {"na_filter": False}  # pandas names duplicates itself
    string = datasets.Value("string")
    return {"na_filter": False, "features": datasets.Features({c: string for c in header})}


def _explain_load_error(files: list[Path] | None, error: Exception) -> str:
    if files is None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return (
            f"cannot load the hub dataset: {first}; without network, download it elsewhere "
            "and point dataset.path at the local files"
        )
    for f in files:
        problem = find_bad_line(f)
        if problem:
            return problem
    return (
        f"cannot read {', '.join(map(str, files))}: {type(error).__name__}: {error}".splitlines()[0]
    )


def check_text(path: Path) -> str | None:
    """`file:line` of the first line of a text data file that is not UTF-8, or "empty"."""
    if path.suffix == ".parquet":
        return None
    blank = True
    offset = 0
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    return (
                        f"{path}:{number}: not UTF-8 (byte {offset + e.start}); "
                        "convert the file to UTF-8"
                    )
                offset += len(raw)
                blank = blank and not raw.strip()
    except OSError as e:
        return f"{path}: cannot read: {e.strerror}"
    return f"{path}: the file is empty; add rows or remove it" if blank else None


def find_bad_line(path: Path) -> str | None:
    """Name the first line of a data file that cannot be a row: undecodable, unparsable JSON, a
    JSON line that is not an object, a CSV row with the wrong number of fields."""
    import json

    problem = check_text(path)
    if problem or path.suffix not in (".json", ".jsonl", ".csv"):
        return problem
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".csv":
        return _find_ragged_row(path, text)
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # not JSON lines: one JSON document with an error
                return f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file"
        else:
            return _check_document(path, document)
    kinds: dict[str, tuple[str, int]] = {}
    for number, line_text in enumerate(text.splitlines(), start=1):
        if not line_text.strip():
            continue
        try:
            row = json.loads(line_text)
        except json.JSONDecodeError as e:
            return f"{path}:{number}: invalid JSON ({e.msg}); fix or delete that line"
        if not isinstance(row, dict):
            return (
                f"{path}:{number}: a JSON {_json_kind(row)}, not an object; every line must be "
                'one row like {"prompt": "...", "response": "..."}'
            )
        for key, value in row.items():
            kind = _json_kind(value)
            first = kinds.setdefault(key, (kind, number))
            if value is not None and first[0] != kind:
                if first[0] == "null":
                    kinds[key] = (kind, number)
                    continue
                return (
                    f"{path}:{number}: column {key!r} is a {kind} here but a {first[0]} on "
                    f"line {first[1]}; give a column one type (quote numbers to make them text)"
                )
    return None


def _json_kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null"


def _check_document(path: Path, document: object) -> str | None:
    if isinstance(document, dict):
        rows = next((v for v in document.values() if isinstance(v, list)), None)
        if rows is None:
            return (
                f"{path}: a JSON object with no list of rows; write a list of objects or JSON lines"
            )
        document = rows
    if not isinstance(document, list):
        return f"{path}: a JSON {_json_kind(document)}; write a list of row objects or JSON lines"
    for i, row in enumerate(document):
        if not isinstance(row, dict):
            return (
                f"{path}: row {i + 1} is a JSON {_json_kind(row)}, not an object; "
                "every row must be an object with the template's columns"
            )
    return None


def _find_ragged_row(path: Path, text: str) -> str | None:
    import csv
    import io

    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return None
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):
                if any("\n" in field for field in row):
                    return (
                        f"{path}:{start}: a quoted field runs on to line {reader.line_num} "
                        f"and the row has {len(row)} of {len(header)} fields; close the quote"
                    )
                fields = f"{len(row)} field" + ("" if len(row) == 1 else "s")
                return (
                    f"{path}:{start}: {fields} but the header has {len(header)}; "
                    "quote fields that contain commas, or fix the row"
                )
            start = reader.line_num + 1
    except csv.Error as e:
        return f"{path}:{reader.line_num}: bad CSV ({e}); fix that line"
    return None
