# Developer tasks. Without `just` installed: python3 scripts/bootstrap.py <task>
set shell := ["bash", "-euo", "pipefail", "-c"]

# list the tasks
default:
    @just --list

# run the embedded default recipe end to end (offline, CPU)
demo:
    recipe run recipes/adgen-tiny.toml

# the whole test suite (unit, CLI, end-to-end on the tiny model), one worker per core (at most
# 4), each test file on one worker so that a file's module fixtures (a trained run) are made once
test *args:
    pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder {{args}}

# the fast tests only (no training)
test-fast:
    pytest -q -m "not slow"

# ruff and mypy
lint:
    ruff check runner tests bench scripts
    ruff format --check runner tests bench scripts
    mypy runner

# format the code
fmt:
    ruff format runner tests bench scripts
    ruff check --fix runner tests bench scripts

# CPU figures for BENCHMARKS.md: start-up times, demo end to end, the all-cached run
bench-cpu:
    python bench/cpu.py

# format + tokenize throughput on 100k generated AdvertiseGen-length rows
bench-data:
    python bench/data.py

# `recipe plan --model`'s memory estimate against the measured peak (CPU: tiny recipe, peak RSS;
# on a GPU machine: `python bench/memory.py --gpu-6b`, ChatGLM3-6B's shape, random weights)
bench-memory:
    python bench/memory.py

# regenerate docs/recipe-reference.md from the schema (a test fails when it is out of date)
docs:
    recipe reference --output docs/recipe-reference.md
