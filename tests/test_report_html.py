"""report.html from hand-made rows: self-contained, escaped, with the loss curve and metrics;
and, where Chromium is installed, a screenshot of it."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from runner.recipe import load_recipe
from runner.report.html import loss_points, recipe_summary, render

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'

HISTORY = [
    {"step": 10, "loss": 2.5, "learning_rate": 1e-3},
    {"step": 20, "loss": 1.5, "learning_rate": 9e-4},
    {"step": 20, "eval_loss": 1.9},
    {"step": 30, "loss": 1.0},
    {"train_runtime": 12.0, "step": 30, "train_loss": 1.6},  # the summary entry has no "loss"
]
SUMMARY = {
    "before": {"bleu-4": 3.0, "rouge-1": 10.0, "rouge-2": 1.0, "rouge-l": 8.0},
    "after": {"bleu-4": 20.5, "rouge-1": 30.0, "rouge-2": 12.0, "rouge-l": 5.0},
    "scored_examples": 1,
    "segmentation": "jieba",
    "heldout_loss": {"before": 3.5, "after": 1.25, "before_ppl": 33.12, "after_ppl": 3.49},
}


def rows() -> list[dict[str, Any]]:
    return [
        {
            "index": 0,
            "prompt": f"用户: {HOSTILE}\n广告: ",
            "reference": "参考 <b>bold</b>",
            "before": HOSTILE,
            "after": "红色 & 蓝色",
            "before_scores": SUMMARY["before"],
            "after_scores": SUMMARY["after"],
        },
        {
            "index": 1,
            "prompt": "an extra prompt",
            "reference": None,
            "before": "old",
            "after": "new",
        },
    ]


def page(history: list[dict[str, Any]] = HISTORY, title: str = "demo <run>") -> str:
    return render(
        title=title,
        summary_pairs=[("recipe", "demo & co")],
        rows=rows(),
        summary=SUMMARY,
        history=history,
        resolved_toml='name = "<toml>"',
        train_metrics={"global_step": 30, "train_loss": 1.6},
    )


def test_every_text_from_data_is_escaped() -> None:
    html = page()
    assert "<script" not in html and "onerror=alert(1)>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img" in html
    assert "参考 &lt;b&gt;bold&lt;/b&gt;" in html
    assert "红色 &amp; 蓝色" in html
    assert "<title>demo &lt;run&gt;</title>" in html
    assert "demo &amp; co" in html and "name = &quot;&lt;toml&gt;&quot;" in html


def test_the_page_is_self_contained() -> None:
    html = page()
    assert "default-src 'none'; img-src data:" in html  # no scripts, no fetches
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", html)


def test_loss_curve_is_an_embedded_png_of_train_and_eval_loss() -> None:
    assert loss_points(HISTORY) == {
        "train": [(10.0, 2.5), (20.0, 1.5), (30.0, 1.0)],
        "eval": [(20.0, 1.9)],
    }
    found = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page())
    assert found, "no embedded PNG"
    png = base64.b64decode(found.group(1))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (990, 396)  # 9 x 3.6 inches at 110 dpi


def test_no_history_says_so_instead_of_a_curve() -> None:
    html = page(history=[])
    assert "data:image/png" not in html
    assert "No loss was logged (train/log_history.json missing or empty)." in html


def test_metrics_table_marks_what_got_better_and_worse() -> None:
    html = page()
    assert (
        '<tr><td>BLEU-4</td><td class="num">3</td><td class="num better">20.5</td>'
        '<td class="num">+17.50</td></tr>'
    ) in html
    assert (
        '<tr><td>ROUGE-L</td><td class="num">8</td><td class="num worse">5</td>'
        '<td class="num">-3.00</td></tr>'
    ) in html
    # loss and perplexity: lower is better
    assert (
        '<tr><td>held-out loss</td><td class="num">3.5</td><td class="num better">1.25</td>'
        '<td class="num">-2.25</td></tr>'
    ) in html
    assert "1 scored example; ROUGE on jieba words, BLEU-4 on characters" in html


def test_examples_side_by_side_with_their_scores() -> None:
    html = page()
    assert html.count("<tr><td>") - 6 == 2  # 6 metric rows, 2 example rows
    assert "(extra prompt, no reference)" in html
    assert "bleu-4 20.5 · rouge-1 30 · rouge-2 12 · rouge-l 5" in html


def test_recipe_summary_shows_the_settings_that_matter(small_recipe: Path) -> None:
    overrides = (
        "lora.r=16",
        "lora.lora_alpha=64",
        "lora.lora_dropout=0.1",
        "lora.target_modules=all-linear",
        "quantization.bnb_4bit_compute_dtype=float32",
        "compare.num_examples=3",
        "compare.max_new_tokens=64",
        'compare.prompts=[{q = "extra"}]',
    )
    pairs = dict(recipe_summary(load_recipe(small_recipe, overrides).data))
    assert pairs["model"] == "builtin:tiny-glm"
    assert pairs["dataset"] == "data (split train)"
    assert pairs["quantization"] == "4-bit nf4, double quant, compute float32"
    assert pairs["LoRA"] == "r 16, alpha 64, dropout 0.1, targets all-linear"
    assert pairs["compare"] == "3 held-out examples, 1 extra prompt, greedy, max_new_tokens 64"
    sampled = dict(
        recipe_summary(
            load_recipe(
                small_recipe,
                ("compare.do_sample=true", "compare.temperature=0.7", "compare.top_p=0.9"),
            ).data
        )
    )
    assert "sampling (temperature 0.7, top_p 0.9, seed 1)" in sampled["compare"]


def _screenshot_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "screenshot_report", ROOT / "scripts" / "screenshot_report.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screenshot_of_the_report(tmp_path: Path) -> None:
    shot = _screenshot_module()
    if shot.find_browser() is None:
        pytest.skip("no Chromium (apt-get install -y chromium)")
    report = tmp_path / "report.html"
    report.write_text(page(), encoding="utf-8")
    png = shot.screenshot(report, tmp_path / "report.png", width=800, height=1200)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (800, 1200)


def test_screenshot_script_reports_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shot = _screenshot_module()
    if shot.find_browser() is None:
        pytest.skip("no Chromium (apt-get install -y chromium)")
    assert shot.main([str(tmp_path / "nope.html"), "--out", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope.html'}: not found\n"


def test_report_files_get_the_usual_permissions_and_no_temp_file(tmp_path: Path) -> None:
    import os

    from runner.state import write_text_atomic

    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "sub" / "report.html", "<p>one</p>")
        write_text_atomic(tmp_path / "sub" / "report.html", "<p>two</p>")
    finally:
        os.umask(umask)
    report = tmp_path / "sub" / "report.html"
    assert report.read_text() == "<p>two</p>"
    assert report.stat().st_mode & 0o777 == 0o644  # shareable, unlike mkstemp's 0600
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]


GOOD = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7}]


@pytest.mark.parametrize(
    ("history_text", "state_text", "curve", "train_line"),
    [
        (None, None, False, False),  # compare run before train wrote anything
        ('{"loss": 1}', None, False, False),  # an object, not a list
        ("[1, 2, null]", None, False, False),  # entries that are not objects
        ('[{"step": "x", "loss": 1}, {"step": 1, "loss": "1.5"}]', None, False, False),
        ('[{"step": 1, "loss": NaN}]', None, False, False),
        ("[{half", None, False, False),
        (None, "[1]", False, False),  # a state file that read_state refuses
        (None, '{"metrics": {"global_step": 3}}', False, False),  # missing every other field
        (json.dumps(GOOD), None, True, False),
        (json.dumps([*GOOD, 7, {"step": True, "loss": 1}]), None, True, False),
        (json.dumps(GOOD), "valid", True, True),
    ],
)
def test_report_from_damaged_run_records(
    small_recipe: Path,
    history_text: str | None,
    state_text: str | None,
    curve: bool,
    train_line: bool,
) -> None:
    """The report reads the log history and the train state through runner/rundir.py: whatever
    a hand edit left there, the page is written, with the curve only where losses are."""
    from runner.context import Context
    from runner.stages.compare import report

    recipe = load_recipe(small_recipe)
    run_dir = recipe.run_dir
    if history_text is not None:
        (run_dir / "train").mkdir(parents=True)
        (run_dir / "train" / "log_history.json").write_text(history_text, encoding="utf-8")
    if state_text == "valid":
        from runner.rundir import new_state
        from runner.state import write_json_atomic

        state = new_state("train") | {
            "status": "done",
            "fingerprint": "ab12",
            **{k: {} for k in ("params", "inputs", "upstream", "libraries")},
            "outputs": [],
            "started": None,
            "ended": None,
            "metrics": {"global_step": 3, "train_loss": 1.25},
        }
        write_json_atomic(run_dir / "state" / "train.json", state)
    elif state_text is not None:
        (run_dir / "state").mkdir(parents=True)
        (run_dir / "state" / "train.json").write_text(state_text, encoding="utf-8")
    html = report(Context(recipe=recipe, run_dir=run_dir, echo=print), rows(), {})
    assert ("data:image/png" in html) is curve
    assert ("No loss was logged" in html) is not curve
    assert ("global_step" in html) is train_line
