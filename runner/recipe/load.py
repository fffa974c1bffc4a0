"""TOML in, a validated Recipe out.

Parse, apply --unset and --set overrides, check schema and cross-field rules.
"""

from __future__ import annotations

import copy
import glob
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from runner.errors import RecipeError
from runner.recipe.confine import (
    Confinement,
    path_errors,
    path_kind,
    read_paths,
    remote_code_errors,
)
from runner.recipe.layers import drop_key, is_local_path, load_layers, lookup, unset_problem
from runner.recipe.mix import TEMPLATE_KEYS
from runner.recipe.model import BUILTIN_TINY, Recipe
from runner.recipe.problems import InvalidRecipe, Problem
from runner.recipe.schema import json_path, schema_errors, subschema, with_defaults

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


_INDEXED = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)\[(?P<index>\d+)\]$")


def parse_override(item: str) -> tuple[tuple[str | int, ...], Any]:
    """`lora.r=16` -> (("lora", "r"), 16), typed by the schema where it can be; a table of an
    array by its index: `dataset.sources[1].rows=2` -> (("dataset", "sources", 1, "rows"), 2)."""
    if "=" not in item:
        raise RecipeError(f"--set {item}: expected KEY=VALUE, e.g. --set lora.r=16")
    key, raw = item.split("=", 1)
    parts = tuple(part.strip() for part in key.strip().split("."))
    if not all(parts):
        raise RecipeError(f"--set {item}: empty key part; write it as table.key=value")
    path: tuple[str | int, ...] = ()
    for part in parts:
        indexed = _INDEXED.match(part)
        path += (indexed["name"], int(indexed["index"])) if indexed else (part,)
    if path[0] == "extends":
        raise RecipeError(
            f"--set {item}: extends cannot be set on the command line; write it in the recipe file"
        )
    try:
        value: Any = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as adamw_torch
    sub = subschema(path)
    types = sub.get("type") if sub else None
    if isinstance(types, str):
        types = [types]
    if types and "string" in types and not isinstance(value, str):
        value = raw
    return path, value


def parse_unset(item: str) -> tuple[str, ...]:
    """`model.tiny` -> ("model", "tiny"); RecipeError naming the key when the schema has none."""
    path = tuple(part.strip() for part in item.strip().split("."))
    if not all(path):
        raise RecipeError(f"--unset {item}: empty key part; write it as table.key, e.g. model.tiny")
    problem = unset_problem(path)
    if problem:
        raise RecipeError(f"--unset {item}: {problem}")
    return path


def _set(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = data
    shown = json_path(path).removeprefix("$.")
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(part, int):  # a table of an array of tables ([[dataset.sources]])
            name = json_path(path[:i]).removeprefix("$.")
            if not isinstance(node, list):
                raise RecipeError(f"--set {shown}: {name} is not an array of tables")
            if not node:
                raise RecipeError(
                    f"--set {shown}: {name} has no tables; add them in the recipe file"
                )
            if part >= len(node):
                raise RecipeError(
                    f"--set {shown}: {name} has {len(node)} tables, [0] to [{len(node) - 1}]; "
                    "add the table in the recipe file"
                )
            if last:
                node[part] = value
            elif not isinstance(node[part], dict):
                raise RecipeError(f"--set {shown}: {name}[{part}] is not a table")
            else:
                node = node[part]
            continue
        if last:
            node[part] = value
            break
        if isinstance(path[i + 1], int):
            node = node.setdefault(part, [])
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {shown}: {part} is not a table")
        node = child


def cross_field_errors(
    written: dict[str, Any], data: dict[str, Any]
) -> list[tuple[tuple[str | int, ...], str]]:
    """Rules a JSON Schema cannot say clearly. `written` is the recipe without defaults."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    q_written = written.get("quantization", {})
    q = data["quantization"]
    if q["load_in_4bit"] and q["load_in_8bit"]:
        errors.append(
            (
                ("quantization", "load_in_8bit"),
                "load_in_8bit and load_in_4bit are both true; set one of them to false",
            )
        )
    if not q["load_in_4bit"]:
        for key in sorted(k for k in q_written if k.startswith("bnb_4bit_")):
            errors.append(
                (
                    ("quantization", key),
                    f"{key} is set but load_in_4bit is false; remove it or set load_in_4bit = true",
                )
            )
    train = data["train"]
    if train["bf16"] is True and train["fp16"]:
        errors.append((("train", "fp16"), "fp16 and bf16 are both true; choose one"))
    if train["fp16"] and q["load_in_4bit"] and q["bnb_4bit_compute_dtype"] == "bfloat16":
        errors.append(
            (
                ("train", "fp16"),
                'fp16 = true with bnb_4bit_compute_dtype = "bfloat16" mixes dtypes; '
                "use bf16 = true (or compute dtype float16 on GPUs without bf16)",
            )
        )
    if train["bf16"] is True and q["load_in_4bit"] and q["bnb_4bit_compute_dtype"] == "float16":
        errors.append(
            (
                ("train", "bf16"),
                'bf16 = true with bnb_4bit_compute_dtype = "float16" mixes dtypes; '
                'use compute dtype "bfloat16" (or fp16 = true on GPUs without bf16)',
            )
        )
    model = data["model"]
    if "tiny" in written.get("model", {}) and model["name_or_path"] != BUILTIN_TINY:
        errors.append(
            (
                ("model", "tiny"),
                f'[model.tiny] only applies to name_or_path = "{BUILTIN_TINY}"; remove it',
            )
        )
    if model["name_or_path"] == BUILTIN_TINY:
        errors.extend(tiny_shape_errors(model["tiny"]))
    template = written.get("template", {})
    sources = data["dataset"].get("sources") or []
    formats = {s.get("format", data["dataset"]["format"]) for s in sources} or {
        data["dataset"].get("format", "template")
    }
    if sources:
        errors.extend(source_errors(written, data))
    else:
        errors.extend(template_errors(template, data["dataset"].get("format", "template")))
        if "path" not in data["dataset"]:
            errors.append(
                (("dataset", "path"), "missing; give dataset.path or [[dataset.sources]] tables")
            )
    if formats == {"template"}:  # a resolved recipe (`recipe show`) writes the default
        set_here = [k for k in ("train_turns", "system") if k in template]
        for key in (k for k in set_here if k == "system" or template[k] != "last"):
            errors.append(
                (
                    ("template", key),
                    "only applies to conversations; set dataset.format "
                    '("messages", "sharegpt" or "alpaca") or remove it',
                )
            )
    ds = data["dataset"]
    # heldout_rows = 0 is fine for compare: it then generates for compare.prompts and says so.
    held = [{**ds, **s} for s in sources] or [ds]
    if train["eval_steps"] > 0 and all(
        h["heldout_split"] is None and h["heldout_rows"] == 0 for h in held
    ):
        errors.append(
            (
                ("train", "eval_steps"),
                "evaluation needs held-out rows: set dataset.heldout_rows > 0 or "
                "dataset.heldout_split, or train.eval_steps = 0",
            )
        )
    if train["early_stopping_patience"] > 0 and train["eval_steps"] == 0:
        errors.append(
            (
                ("train", "early_stopping_patience"),
                "early stopping watches the held-out loss: set train.eval_steps > 0 "
                "(e.g. the same as save_steps), or early_stopping_patience = 0",
            )
        )
    errors.extend(launch_errors(data))
    return errors


def template_errors(template: dict[str, Any], fmt: str) -> list[tuple[tuple[str, ...], str]]:
    """Exactly one of prompt / prompt_file (and of response / response_file) for the template
    format, none for a conversation format."""
    errors: list[tuple[tuple[str, ...], str]] = []
    for part in ("prompt", "response"):
        given = [k for k in (part, f"{part}_file") if k in template]
        if fmt != "template" and given:
            errors.append(
                (
                    ("template", given[0]),
                    f'not used with dataset.format = "{fmt}" (conversations are rendered by '
                    "template.format); remove it",
                )
            )
        elif fmt == "template" and len(given) != 1:
            what = "both" if given else "neither"
            errors.append(
                (("template", part), f"{what} of {part} and {part}_file given; set exactly one")
            )
    return errors


def source_errors(
    written: dict[str, Any], data: dict[str, Any]
) -> list[tuple[tuple[str | int, ...], str]]:
    """[[dataset.sources]]: no dataset.path beside them, weight or rows (not both), a weight on
    every source or on none, and each source's templates as its format needs them."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    ds_written = written.get("dataset", {})
    sources = data["dataset"]["sources"]
    if "path" in ds_written:
        errors.append(
            (
                ("dataset", "path"),
                "set together with [[dataset.sources]]; give each source its own path and "
                "remove dataset.path (or remove the sources)",
            )
        )
    weighted = [i for i, s in enumerate(sources) if "weight" in s]
    template = written.get("template", {})
    shared_used = False
    for i, src in enumerate(sources):
        here: tuple[str | int, ...] = ("dataset", "sources", i)
        if "weight" in src and "rows" in src:
            errors.append(((*here, "rows"), "weight and rows both given; set one of them"))
        elif weighted and "weight" not in src:
            errors.append(
                (
                    here,
                    f"no weight, but dataset.sources[{weighted[0]}] has one; give every "
                    "source a weight, or none (then each takes its rows, or all its rows)",
                )
            )
        fmt = src.get("format", data["dataset"]["format"])
        for part in ("prompt", "response"):
            own = [k for k in (part, f"{part}_file") if k in src]
            if fmt != "template" and own:
                errors.append(
                    (
                        (*here, own[0]),
                        f'not used with format = "{fmt}" (conversations are rendered by '
                        "template.format); remove it",
                    )
                )
            elif fmt == "template" and len(own) == 2:
                errors.append(
                    ((*here, part), f"both {part} and {part}_file given; set exactly one")
                )
            elif fmt == "template" and not own:
                shared = [k for k in (part, f"{part}_file") if k in template]
                shared_used = True
                if len(shared) != 1:
                    errors.append(
                        (
                            (*here, part),
                            f"a template source without {part} or {part}_file, and [template] "
                            f"has {'both' if shared else 'neither'}; set one here or in "
                            "[template]",
                        )
                    )
    if not shared_used:
        for key in (k for k in TEMPLATE_KEYS if k in template):
            errors.append(
                (
                    ("template", key),
                    "used by no source (each sets its own, or is a conversation); remove it",
                )
            )
    return errors


def tiny_shape_errors(tiny: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """Head counts the tiny model cannot be built with (transformers fails deep in a stage)."""
    errors: list[tuple[tuple[str, ...], str]] = []
    hidden, heads, kv = tiny["hidden_size"], tiny["num_heads"], tiny["num_kv_heads"]
    if hidden % heads:
        errors.append(
            (
                ("model", "tiny", "num_heads"),
                f"hidden_size {hidden} is not a multiple of num_heads {heads}; "
                "choose num_heads that divides it (e.g. 8)",
            )
        )
    if heads % kv:
        errors.append(
            (
                ("model", "tiny", "num_kv_heads"),
                f"num_heads {heads} is not a multiple of num_kv_heads {kv}; "
                "choose num_kv_heads that divides it (e.g. 1 or 2)",
            )
        )
    return errors


def launch_errors(data: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """[launch] combinations that cannot work."""
    errors: list[tuple[tuple[str, ...], str]] = []
    launch, q, train = data["launch"], data["quantization"], data["train"]
    if launch["machine_rank"] >= launch["num_machines"]:
        errors.append(
            (
                ("launch", "machine_rank"),
                f"machine_rank {launch['machine_rank']} is not below num_machines "
                f"{launch['num_machines']}; machines are numbered 0 to num_machines - 1",
            )
        )
    if (
        launch["num_machines"] > 1
        and launch["main_process_ip"] is None
        and launch["config_file"] is None
    ):
        errors.append(
            (
                ("launch", "main_process_ip"),
                "several machines need the address of machine 0: set main_process_ip "
                "(or an accelerate config_file)",
            )
        )
    if launch["strategy"] != "fsdp":
        return errors
    if q["load_in_8bit"]:
        errors.append(
            (
                ("launch", "strategy"),
                "FSDP cannot shard 8-bit (LLM.int8) weights; use quantization.load_in_4bit "
                'with bnb_4bit_quant_storage = the compute dtype, or strategy = "ddp"',
            )
        )
    if q["load_in_4bit"]:
        compute = q["bnb_4bit_compute_dtype"]
        wanted = "bfloat16" if compute == "auto" else compute
        if q["bnb_4bit_quant_storage"] != wanted:
            errors.append(
                (
                    ("quantization", "bnb_4bit_quant_storage"),
                    f"FSDP shards 4-bit weights only when they are stored in the compute "
                    f'dtype; set bnb_4bit_quant_storage = "{wanted}" (now '
                    f'"{q["bnb_4bit_quant_storage"]}")',
                )
            )
    for key in ("torch_compile", "chunked_cross_entropy"):
        if train[key] is True:
            errors.append(
                (
                    ("train", key),
                    f'{key} = true is not supported with strategy = "fsdp"; use "auto" '
                    '(off under FSDP) or strategy = "ddp"',
                )
            )
    if "8bit" in train["optim"]:
        errors.append(
            (
                ("train", "optim"),
                f"FSDP cannot shard the state of the bitsandbytes optimizer "
                f'"{train["optim"]}"; use optim = "adamw_torch" (the adapters are '
                "small: the 32-bit state costs little)",
            )
        )
    return errors


def load_recipe(
    path: Path | str,
    overrides: tuple[str, ...] | list[str] = (),
    allow: Iterable[str | Path] = (),
    unsets: tuple[str, ...] | list[str] = (),
    *,
    lenient: bool = False,
    check_files: bool = False,
) -> Recipe:
    """Read (with the files it extends), override, validate. Raises RecipeError with one line
    per problem (an InvalidRecipe, which also carries each problem's file, line and key).
    `allow`: folders outside the recipe root the person running lets it read (--allow-path).
    `unsets`: keys removed (--unset) before `overrides` apply; `lenient`: an unset of a key that
    is not set is no error (settings a run directory remembers, re-applied to an edited file).
    `check_files`: local data, template and corpus files must exist (`recipe validate`)."""
    shown = Path(path)  # as the user wrote it, for messages
    path = shown.expanduser().resolve()
    confinement = Confinement.for_recipe(path, allow)
    merged = load_layers(shown, confinement)
    origins = dict(merged.origins)
    written = copy.deepcopy(merged.data)
    # --unset first, then --set: `--unset quantization --set quantization.load_in_8bit=true`
    # replaces a table; the other order could only undo a --set of the same command.
    unset_errors: list[str] = []
    for item in unsets:
        try:
            key = parse_unset(item)
        except RecipeError as e:
            unset_errors.extend(e.lines)
            continue
        if not drop_key(written, origins, key) and not lenient:
            files = "" if len(merged.files) == 1 else " (or a file it extends)"
            unset_errors.append(
                f"--unset {item}: {shown}{files} does not set {'.'.join(key)}, so there is "
                "nothing to unset (a key left out takes its default); check the key"
            )
    if unset_errors:
        raise RecipeError(unset_errors)
    from_set: dict[tuple[str, ...], str] = {}
    for item in overrides:
        set_key, value = parse_override(item)
        _set(written, set_key, value)
        from_set[tuple(str(k) for k in set_key)] = item

    def problem(p: tuple[str | int, ...], message: str) -> Problem:
        strs = tuple(str(x) for x in p)
        for i in range(len(strs), 0, -1):
            if strs[:i] in from_set:
                return Problem(str(shown), None, json_path(p), message, set_item=from_set[strs[:i]])
        origin = lookup(origins, p)
        if origin is None:
            return Problem(str(shown), 1, json_path(p), message)
        return Problem(origin.shown, origin.line, json_path(p), message)

    def by_line(found: Sequence[tuple[tuple[str | int, ...], str]]) -> list[Problem]:
        def order(item: tuple[tuple[str | int, ...], str]) -> tuple[int, int, str]:
            origin = lookup(origins, item[0])
            rank, line = (origin.rank, origin.line) if origin else (0, 0)
            return rank, line, json_path(item[0])

        return [problem(p, m) for p, m in sorted(found, key=order)]

    errors = by_line(schema_errors(written))
    if errors:
        raise InvalidRecipe(errors)
    full = with_defaults(written)
    errors = by_line(cross_field_errors(written, full))
    if errors and (overrides or unsets):
        errors = [_with_unset_hint(p, from_set) for p in errors]
    if errors:
        raise InvalidRecipe(errors)
    # Where the recipe reads and writes: checked here so validate and plan report it too. A run
    # directory given with --set is the choice of the person running, not of the recipe.
    chosen = ("recipe", "output_dir") in from_set
    refused = path_errors(written, path.parent, confinement, chosen)
    if check_files:  # a path the recipe may not read is reported as that, not as missing
        keys = {key for key, _ in refused}
        refused += [e for e in missing_file_errors(written, path.parent) if e[0] not in keys]
    errors = by_line(refused)
    errors += by_line(remote_code_errors(full, path.parent))
    if errors:
        raise InvalidRecipe(errors)
    where = {".".join(k): o.path for k, o in origins.items() if o.path != path}
    where.update({".".join(k): path for k in from_set})  # --set paths are relative to the recipe
    return Recipe(
        path=path,
        data=full,
        written=written,
        overrides=tuple(overrides),
        unsets=tuple(unsets),
        origins=where,
        files=tuple(merged.files),
        confinement=confinement,
    )


def missing_file_errors(
    written: dict[str, Any], base_dir: Path
) -> list[tuple[tuple[str | int, ...], str]]:
    """Local files and folders the recipe names that are not there (hub ids are not checked:
    that needs the network). Paths are relative to the recipe file (parents' were rebased)."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    for key, value in read_paths(written):
        kind = path_kind(key)
        if kind == ("model", "name_or_path") and not value.startswith((".", "/", "~")):
            continue  # a hub id (gpt2, THUDM/chatglm3-6b) or builtin:tiny-glm
        if kind == ("dataset", "path") and not is_local_path(kind, value, base_dir):
            continue
        target = base_dir / Path(value).expanduser()
        if kind == ("dataset", "path") and any(c in value for c in "*?["):
            if not glob.glob(str(target), recursive=True):
                errors.append((key, f"{value!r} matches no file; check the pattern"))
        elif not target.exists():
            errors.append(
                (
                    key,
                    f"{value!r} not found (looked for {os.path.normpath(target)}); the path is "
                    "relative to the file that sets it",
                )
            )
    return errors


def _with_unset_hint(problem: Problem, from_set: dict[tuple[str, ...], str]) -> Problem:
    """On the command line, the way to remove a key a file sets is --unset: say so."""
    if problem.path is None:
        return problem
    key = problem.path.removeprefix("$.")
    if "[" in key:  # inside an array of tables: --unset cannot reach one table's key
        return problem
    message = problem.message
    if "remove it" in message and not problem.set_item:
        message = message.replace("remove it", f"remove it (--unset {key})", 1)
    elif message.startswith("both of ") and problem.set_item:
        table, part = key.split(".", 1)
        other = part.removesuffix("_file") if part.endswith("_file") else f"{part}_file"
        if (table, other) not in from_set:
            message += f" (add --unset {table}.{other} to drop the recipe's)"
    return Problem(problem.file, problem.line, problem.path, message, problem.set_item)


def validation_report(
    files: Sequence[Path],
    overrides: Sequence[str] = (),
    allow: Iterable[str | Path] = (),
    unsets: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """`recipe validate --format json`: every problem of every file as {file, line, path, message}
    (line and path null where a problem has none, e.g. a file that does not parse)."""
    found: list[dict[str, Any]] = []
    for f in files:
        try:
            load_recipe(f, tuple(overrides), tuple(allow), tuple(unsets), check_files=True)
        except InvalidRecipe as e:
            found.extend(p.as_json() for p in e.problems)
        except RecipeError as e:
            found.extend(
                {"file": str(f), "line": None, "path": None, "message": line} for line in e.lines
            )
    return found
