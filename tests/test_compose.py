"""Composability (issue 17, part 6): --unset and `unset = [...]`, the settings a run directory
remembers, prompt templates' final newline and the lint of a prompt glued to its response,
missing local files in `recipe validate`, and `recipe chat`'s conversation. Fast: no model is
built, no training runs (the format stage runs on 20 rows where a stage must run)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from datakit import make_tokenizer, mark_done, write_recipe

from runner.cli import cli
from runner.data.chat import Encoder
from runner.data.lint import format_warnings, glued_counts
from runner.data.templates import Renderer, template_sources
from runner.plan import format_inputs
from runner.recipe import load_recipe
from runner.rundir import SETTINGS, followed_settings, write_settings
from runner.use import chat_loop

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "adgen-tiny.toml"


def invoke(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), input=stdin)
    return result.exit_code, result.stdout, result.stderr


# -- --unset on the command line --------------------------------------------------------------
def test_unset_a_table_then_set_switches_adgen_tiny_off_quantization() -> None:
    code, out, err = invoke(
        "show", str(TINY), "--unset", "quantization", "--set", "quantization.load_in_4bit=false"
    )
    assert (code, err) == (0, "")
    assert "# --unset quantization\n# --set quantization.load_in_4bit=false\n" in out
    recipe = load_recipe(TINY, ["quantization.load_in_4bit=false"], unsets=["quantization"])
    assert recipe.written["quantization"] == {"load_in_4bit": False}
    assert recipe.get("quantization.bnb_4bit_quant_type") == "nf4"  # the default again, unused
    eight = load_recipe(
        TINY,
        ["quantization.load_in_4bit=false", "quantization.load_in_8bit=true"],
        unsets=["quantization"],
    )
    assert eight.written["quantization"] == {"load_in_4bit": False, "load_in_8bit": True}


def test_set_alone_names_each_clashing_key_and_its_unset() -> None:
    code, out, err = invoke("validate", str(TINY), "--set", "quantization.load_in_4bit=false")
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"{TINY}:{line}: $.quantization.{key}: {key} is set but load_in_4bit is false; remove it "
        f"(--unset quantization.{key}) or set load_in_4bit = true"
        for line, key in (
            (42, "bnb_4bit_quant_type"),
            (43, "bnb_4bit_use_double_quant"),
            (44, "bnb_4bit_compute_dtype"),
        )
    ]


def test_another_model_with_unset_tiny() -> None:
    assert invoke("validate", str(TINY), "--set", "model.name_or_path=gpt2") == (
        2,
        "",
        f'{TINY}:21: $.model.tiny: [model.tiny] only applies to name_or_path = "builtin:tiny-glm"'
        "; remove it (--unset model.tiny)\n",
    )
    code, out, _ = invoke(
        "validate", str(TINY), "--set", "model.name_or_path=gpt2", "--unset", "model.tiny"
    )
    assert (code, out) == (0, f"{TINY}: ok\n")


def test_inline_prompt_replaces_the_prompt_file() -> None:
    prompt = "template.prompt=Ad for {{ content }}:\n"
    assert invoke("validate", str(TINY), "--set", prompt) == (
        2,
        "",
        f"--set {prompt}: $.template.prompt: both of prompt and prompt_file given; set exactly "
        "one (add --unset template.prompt_file to drop the recipe's)\n",
    )
    recipe = load_recipe(TINY, [prompt], unsets=["template.prompt_file"])
    assert "prompt_file" not in recipe.written["template"]
    assert template_sources(recipe)["prompt"].source == "Ad for {{ content }}:\n"


def test_unknown_or_unsettable_keys_are_one_line_each_all_at_once() -> None:
    code, out, err = invoke(
        "plan",
        str(TINY),
        *("--unset", "quantization.load_in_4bt"),
        *("--unset", "trian"),
        *("--unset", "lora.r.x"),
        *("--unset", "extends"),
        *("--unset", "train.eval_steps"),
        *("--unset", "lora..r"),
    )
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "--unset quantization.load_in_4bt: unknown key 'quantization.load_in_4bt'; "
        "did you mean quantization.load_in_4bit?",
        "--unset trian: unknown key 'trian'; did you mean train?",
        "--unset lora.r.x: unknown key 'lora.r.x'; lora.r is a value, not a table",
        "--unset extends: extends cannot be unset; edit the recipe file",
        f"--unset train.eval_steps: {TINY} does not set train.eval_steps, so there is nothing "
        "to unset (a key left out takes its default); check the key",
        "--unset lora..r: empty key part; write it as table.key, e.g. model.tiny",
    ]


def test_unset_in_a_map_and_in_json_validation(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False, dataset={"columns": {"q": "q", "a": "a"}})
    loaded = load_recipe(recipe, unsets=["dataset.columns.a"])
    assert loaded.written["dataset"]["columns"] == {"q": "q"}
    code, out, _ = invoke("validate", "--format", "json", str(recipe), "--unset", "lora.x")
    assert code == 2
    assert json.loads(out) == [
        {
            "file": str(recipe),
            "line": None,
            "path": None,
            "message": "--unset lora.x: unknown key 'lora.x'; lora has: bias, "
            "layers_to_transform, lora_alpha, lora_dropout, modules_to_save, r, target_modules, "
            "use_dora, use_rslora",
        }
    ]


# -- unset = [...] in an extending recipe -----------------------------------------------------
def _child(tmp_path: Path, head: str, body: str = "") -> Path:
    write_recipe(tmp_path, tokenizer=False, model={"name_or_path": "builtin:tiny-glm"})
    base = tmp_path / "recipe.toml"
    base.write_text(
        base.read_text(encoding="utf-8") + '\n[model.tiny]\ncorpus = "data/train.jsonl"\n',
        encoding="utf-8",
    )
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "recipe.toml"\n{head}\n{body}', encoding="utf-8")
    return child


def test_extending_recipe_unsets_what_its_parent_sets(tmp_path: Path) -> None:
    child = _child(
        tmp_path,
        'unset = ["model.tiny", "template.response", "tokenize"]',
        '[model]\nname_or_path = "tok"\n[template]\nresponse_file = "r.j2"\n',
    )
    (tmp_path / "r.j2").write_text("{{ a }}\n", encoding="utf-8")
    recipe = load_recipe(child)
    assert recipe.written["model"] == {"name_or_path": "tok"}
    assert recipe.written["template"] == {"prompt": "Q: {{ q }}\nA: ", "response_file": "r.j2"}
    assert "tokenize" not in recipe.written
    assert recipe.get("tokenize.max_length") == 512  # the default again


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (
            'unset = ["lora.rr", "model.tiny.corpus", "train.max_steps"]',
            [
                "$.unset: lora.rr: unknown key 'lora.rr'; did you mean lora.r?",
                "$.unset: train.max_steps: 'train.max_steps' is not set by the files this one "
                "extends; remove it from unset (a key left out takes its default)",
            ],
        ),
        (
            'unset = "model.tiny"',
            ["$.unset: 'model.tiny' is not a list of keys; write unset = [\"model.tiny\"]"],
        ),
    ],
)
def test_bad_unset_lists_name_the_file_line_and_key(
    tmp_path: Path, head: str, message: list[str]
) -> None:
    child = _child(tmp_path, f"\n{head}")
    code, out, err = invoke("validate", str(child))
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"{child}:3: {m}" for m in message]


def test_unset_without_extends_is_an_error(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tokenizer=False)
    recipe.write_text('unset = ["lora.r"]\n' + recipe.read_text(encoding="utf-8"))
    assert invoke("validate", str(recipe)) == (
        2,
        "",
        f"{recipe}:1: $.unset: unset removes keys a parent sets, and this file extends none; "
        "remove the keys from this file instead\n",
    )


# -- the settings a run directory remembers ---------------------------------------------------
def test_plan_status_and_export_follow_the_last_runs_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe_file = write_recipe(tmp_path)
    sets = ("lora.r=4", "train.max_steps=3", f"recipe.output_dir={tmp_path / 'run'}")
    mark_done(recipe_file, sets, unsets=("tokenize.max_length",))
    write_settings(load_recipe(recipe_file, sets, unsets=["tokenize.max_length"]))
    assert json.loads((tmp_path / "run" / SETTINGS).read_text()) == {
        "recipe": str(recipe_file),
        "set": ["lora.r=4", "train.max_steps=3"],  # the run directory is chosen, not followed
        "unset": ["tokenize.max_length"],
    }
    note = (
        f"following the last run in {tmp_path / 'run'}: --unset tokenize.max_length "
        "--set lora.r=4 --set train.max_steps=3"
    )
    code, out, _ = invoke("plan", "recipe.toml")
    assert code == 0
    assert out.splitlines()[0] == note
    assert [line.split()[1] for line in out.splitlines()[2:]] == ["done"] * 6
    code, out, _ = invoke("status", "recipe.toml")
    assert out.splitlines()[0] == note
    assert "stale" not in out
    # a setting given now goes on top of the stored ones
    code, out, _ = invoke("plan", "recipe.toml", "--set", "lora.r=8")
    assert out.splitlines()[0] == (
        f"following the last run in {tmp_path / 'run'}: --unset tokenize.max_length "
        "--set train.max_steps=3"
    )
    assert "quantize-load  stale" in out and "changed params: lora.r 4 -> 8" in out
    code, out, err = invoke("export", "recipe.toml", "--adapter", "out")
    assert (code, out) == (2, "")
    assert err.splitlines()[0] == note  # before it finds the faked adapter folder empty


def test_command_line_settings_replace_or_drop_stored_ones(tmp_path: Path) -> None:
    recipe_file = write_recipe(tmp_path, tokenizer=False)
    write_settings(load_recipe(recipe_file, ["lora.r=4", "train.max_steps=3"], unsets=["tokenize"]))
    run_dir = tmp_path / "run"
    assert followed_settings(run_dir, ("lora.r=16",), ("train",)) == (
        ("lora.r=16",),
        ("tokenize", "train"),
        "--unset tokenize",
    )
    assert followed_settings(run_dir, ("lora.r=4", "train.max_steps=3"), ("tokenize",)) is None
    (run_dir / SETTINGS).write_text("{broken")  # damaged: the recipe as written
    assert followed_settings(run_dir, (), ()) is None


def test_a_plain_run_says_which_stored_settings_it_leaves_out(tmp_path: Path) -> None:
    recipe_file = write_recipe(tmp_path)
    code, out, _ = invoke(
        "run", str(recipe_file), "--set", "dataset.shuffle=false", "--until", "format"
    )
    assert code == 0, out
    assert out.splitlines()[0] == "format: running (never ran)"
    code, out, _ = invoke("plan", str(recipe_file))
    assert out.splitlines()[2].split()[:2] == ["format", "done"]
    code, out, _ = invoke("run", str(recipe_file), "--until", "format")
    assert code == 0, out
    assert out.splitlines()[:2] == [
        f"note: the last run in {tmp_path / 'run'} used --set dataset.shuffle=false; this run "
        "uses only the options given now (pass those again to keep them)",
        "format: running (changed params: dataset.shuffle False -> True)",
    ]
    code, out, _ = invoke("plan", str(recipe_file))  # follows the plain run now
    assert out.splitlines()[0] == f"recipe data-test: run dir {tmp_path / 'run'}"


# -- templates: the prompt's final newline, the lint -------------------------------------------
def test_prompt_keeps_its_final_newline_the_response_drops_one(tmp_path: Path) -> None:
    (tmp_path / "p.j2").write_text("### Instruction:\n{{ q }}\n### Response:\n")
    (tmp_path / "r.j2").write_text("{{ a }}\n")
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            tokenizer=False,
            template={
                "prompt": None,
                "response": None,
                "prompt_file": "p.j2",
                "response_file": "r.j2",
            },
        )
    )
    rendered = Renderer(template_sources(recipe)).render({"q": "hi", "a": "hello"}, 1)
    assert rendered == ("### Instruction:\nhi\n### Response:\n", "hello")
    # the same file rendered without that newline before: the format stage must re-run
    assert format_inputs(recipe)["prompt_final_newline"] == "kept"


def test_shipped_adgen_prompts_render_byte_identically() -> None:
    for name in ("adgen.toml", "adgen-tiny.toml", "adgen-fast.toml"):
        recipe = load_recipe(ROOT / "recipes" / name)
        row = {"content": "类型#裙*颜色#红色", "summary": "红色的裙子"}
        assert Renderer(template_sources(recipe)).render(row, 1) == (
            "用户: 类型#裙*颜色#红色\n广告: ",
            "红色的裙子",
        )
        assert "prompt_final_newline" not in format_inputs(recipe)  # fingerprints unchanged


@pytest.mark.parametrize(
    ("prompt", "response", "glued"),
    [
        ("### Response:", "The answer", True),
        ("Answer", "Paris", True),
        ("问题: 红色", "连衣裙", True),
        ("### Response:\n", "The answer", False),
        ("Answer: ", "Paris", False),
        ("广告:", "这款连衣裙", False),  # Chinese copy after a colon: how it is written
        ("Q:", " A", False),
        ("Q: (", "x", False),
    ],
)
def test_lint_warns_when_a_prompt_runs_into_its_response(
    prompt: str, response: str, glued: bool
) -> None:
    counts = glued_counts([prompt], [response], [7], "plain")
    assert bool(counts) is glued
    assert glued_counts([prompt], [response], [7], "chat_template") == {}  # a role header between


def test_glue_warning_text() -> None:
    counts = glued_counts(
        ["### Instruction:\nsay hi\n### Response:", "x\n"], ["Hello there", "y"], [3, 4], "plain"
    )
    assert format_warnings(counts) == [
        "train: the prompt runs straight into the response in 1 of 2 rows checked (row 3: "
        "'hi\\n### Response:' + 'Hello there'): the model cannot tell where its answer starts; end "
        "the prompt template with a newline or a space (a template file keeps its final newline)"
    ]


def test_format_stage_records_the_glue_warning(tmp_path: Path) -> None:
    recipe_file = write_recipe(
        tmp_path, template={"prompt": "Q: {{ q }}\nA:"}, dataset={"shuffle": False}
    )
    code, out, _ = invoke("run", str(recipe_file), "--until", "format")
    assert code == 0, out
    assert out.splitlines()[1] == (
        "format: warning: train: the prompt runs straight into the response in 16 of 16 rows "
        "checked (row 1: 'Q: question 0\\nA:' + 'answer 0'): the model cannot tell where its "
        "answer starts; end the prompt template with a newline or a space (a template file "
        "keeps its final newline)"
    )
    code, out, _ = invoke("status", str(recipe_file))
    assert "      warning: train: the prompt runs straight into the response" in out


# -- validate: missing local files ------------------------------------------------------------
def test_validate_reports_every_missing_local_file(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        tokenizer=False,
        model={"name_or_path": "builtin:tiny-glm"},
        dataset={"path": "missing/train.jsonl"},
        template={"prompt": None, "prompt_file": "prompts/p.j2"},
    )
    recipe.write_text(
        recipe.read_text(encoding="utf-8") + '\n[model.tiny]\ncorpus = "corpus.jsonl"\n'
    )
    code, out, err = invoke("validate", str(recipe))
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        f"{recipe}:{line}: $.{key}: '{value}' not found (looked for {tmp_path / value}); the "
        "path is relative to the file that sets it"
        for line, key, value in (
            (10, "dataset.path", "missing/train.jsonl"),
            (15, "template.prompt_file", "prompts/p.j2"),
            (21, "model.tiny.corpus", "corpus.jsonl"),
        )
    ]
    code, _, err = invoke("validate", str(recipe), "--set", "dataset.path=nothing/*.jsonl")
    assert err.splitlines()[0] == (
        "--set dataset.path=nothing/*.jsonl: $.dataset.path: 'nothing/*.jsonl' matches no file; "
        "check the pattern"
    )


def test_validate_leaves_hub_ids_alone() -> None:
    code, out, _ = invoke("validate", str(ROOT / "recipes" / "adgen.toml"))
    assert (code, out) == (0, f"{ROOT / 'recipes' / 'adgen.toml'}: ok\n")


# -- chat: the conversation --------------------------------------------------------------------
@dataclass
class Remembering:
    """Stands in for runner.use.Session: answers with the number of messages it was given."""

    label: str = "stand-in"
    seen: list[list[str]] = field(default_factory=list)

    def chat(self, messages: list[dict[str, str]], limit: int) -> tuple[str, int]:
        self.seen.append([f"{m['role']}:{m['content']}" for m in messages])
        return f"reply {len(messages)}", 0


def test_chat_keeps_the_conversation_until_reset_and_exit(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tokenizer=False))
    model, said, notes = Remembering(), [], []
    lines = ["one\n", "two\n", "/reset\n", "three\n", "/exit\n", "never\n"]
    n = chat_loop(model, recipe, iter(lines), say=said.append, note=notes.append)  # type: ignore[arg-type]
    assert n == 3
    assert model.seen == [
        ["user:Q: one\nA: "],
        ["user:Q: one\nA: ", "assistant:reply 1", "user:Q: two\nA: "],
        ["user:Q: three\nA: "],
    ]
    assert said == ["reply 1", "reply 3", "reply 1"]
    assert notes == [
        "chat with the stand-in: each line is the template's `q`; the conversation is kept "
        "(/reset starts over); /exit or Ctrl-D ends",
        "(conversation reset)",
    ]


def test_conversation_ids_join_turns_in_the_models_format() -> None:
    from datakit import IM_TEMPLATE

    turns = [
        {"role": "user", "content": "question 1"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "question 2"},
    ]
    tok = make_tokenizer(chat_template=IM_TEMPLATE)
    chat = Encoder(tok, "chat_template")
    assert tok.decode(chat.conversation_ids(turns)) == (
        "<|im_start|>user\nquestion 1<|im_end|>\n<|im_start|>assistant\nanswer 1<|im_end|>\n"
        "<|im_start|>user\nquestion 2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat.conversation_ids(turns[:1]) == chat.prompt_ids(["question 1"])[0]
    glm = Encoder(make_tokenizer(chatglm3=True), "chatglm3")
    assert glm.tok.decode(glm.conversation_ids(turns)) == (
        "[gMASK]sop<|user|>\nquestion 1<|assistant|>\nanswer 1<|user|>\nquestion 2<|assistant|>"
    )
    plain_tok = make_tokenizer()
    plain = Encoder(plain_tok, "plain")
    # each earlier exchange as a training row (bos, prompt, reply, eos), then the new prompt
    assert plain_tok.decode(plain.conversation_ids(turns)) == (
        "<s>question 1answer 1</s><s>question 2"
    )


def test_session_chat_leaves_out_the_oldest_exchanges_that_do_not_fit() -> None:
    from runner.use import Session

    class Model:
        pass

    tok = make_tokenizer()
    session = Session(Model(), tok, Encoder(tok, "plain"), {}, 0, "x")
    seen: list[list[int]] = []

    def fake_generate(model, tok_, prompt_ids, cfg, seed):  # type: ignore[no-untyped-def]
        seen.extend(prompt_ids)
        return [[]]

    import runner.models.generate as gen

    turns = [
        {"role": "user", "content": "question 1 " * 5},
        {"role": "assistant", "content": "answer 1 " * 5},
        {"role": "user", "content": "question 2"},
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gen, "generate_ids", fake_generate)
        _, dropped = session.chat(turns, limit=8)
    assert dropped == 2
    assert seen == [session.encoder.prompt_ids(["question 2"])[0]]
