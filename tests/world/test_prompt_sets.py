"""Prompt files in Flow-GRPO's formats (flowopd.world.prompt_sets): lines and GenEval metadata JSONL, through the data phase."""

import json

import pytest
import yaml

from flowopd.methods.router import Router
from flowopd.spec import validate_spec
from flowopd.world import Prompt, text_prompt
from flowopd.world.prompt_sets import (
    FilePrompt,
    build_prompt_sets,
    read_prompt_file,
    read_prompts,
    write_prompt_sets,
)

GENEVAL = [
    {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}],
     "prompt": "a photo of three dogs"},
    {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "sofa", "count": 1,
                                                                   "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a sofa"},
]


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_lines_format_strips_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "ocr.txt", 'A sign that says "Open"\n\n   \n  a mug reading "Café"  \r\nlast line')
    prompts = read_prompt_file(path, "lines", "ocr")
    assert [p.text for p in prompts] == ['A sign that says "Open"', 'a mug reading "Café"', "last line"]
    assert all(p.task == p.kind == "ocr" and p.metadata == {} and p.word == "" for p in prompts)


def test_geneval_jsonl_keeps_metadata(tmp_path):
    path = write(tmp_path / "m.jsonl", "".join(json.dumps(r) + "\n" for r in GENEVAL) + "\n")
    prompts = read_prompt_file(path, "geneval_jsonl", "geneval")
    assert [p.text for p in prompts] == ["a photo of three dogs", "a photo of a cat left of a sofa"]
    assert [p.kind for p in prompts] == ["counting", "position"] and prompts[0].task == "geneval"
    assert prompts[0].metadata == {k: v for k, v in GENEVAL[0].items() if k != "prompt"}
    assert prompts[1].metadata["include"][1]["position"] == ["left of", 0]


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "ok"}\n{"tag": "x"}\n', r"m.jsonl:2: needs a non-empty string \"prompt\""),
    ('{"prompt": "ok"}\nnot json\n', "m.jsonl:2: not a JSON object"),
    ('["a list"]\n', "m.jsonl:1: needs a non-empty string"),
    ("\n\n", "m.jsonl: no prompts"),
])
def test_bad_geneval_files_name_file_and_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        read_prompt_file(write(tmp_path / "m.jsonl", text), "geneval_jsonl", "geneval")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt not found.*task 'ocr'"):
        read_prompt_file(tmp_path / "nowhere.txt", "lines", "ocr")
    with pytest.raises(ValueError, match="unknown prompt file format 'csv'"):
        read_prompt_file(write(tmp_path / "a.txt", "x\n"), "csv", "ocr")


def test_file_prompts_round_trip_and_tiny_prompts_unchanged(tmp_path):
    tiny = text_prompt("KO")
    file_prompt = FilePrompt(text="a photo of three dogs", task="geneval", kind="counting", metadata=GENEVAL[0])
    plain = FilePrompt(text="a fox", task="pick", kind="pick")
    assert isinstance(file_prompt, Prompt) and len({tiny, file_prompt, plain}) == 3  # hashable
    write_prompt_sets({"t": {"train": [tiny, file_prompt, plain]}}, tmp_path)
    back = read_prompts(tmp_path, "t", "train")
    assert back == [tiny, file_prompt, plain]
    assert [type(p) for p in back] == [Prompt, FilePrompt, FilePrompt]
    assert "metadata" not in (tmp_path / "t.train.jsonl").read_text().splitlines()[0]  # tiny lines unchanged


def test_data_phase_mixes_file_and_tiny_tasks_and_routes_by_origin(tmp_path):
    write(tmp_path / "data/geneval/train_metadata.jsonl", "".join(json.dumps(r) + "\n" for r in GENEVAL))
    write(tmp_path / "data/geneval/test_metadata.jsonl", json.dumps(GENEVAL[1]) + "\n")
    write(tmp_path / "data/pick/train.txt", "a watercolour fox\na neon city at night\n")
    write(tmp_path / "data/pick/test.txt", "a red bicycle\n")
    spec = validate_spec(yaml.safe_load("""
        name: files
        tasks:
          text: {prompts: {kind: tiny, task: text, n_train: 4, n_test: 2}, reward: ocr}
          geneval:
            prompts: {kind: file, format: geneval_jsonl, train: data/geneval/train_metadata.jsonl,
                      test: data/geneval/test_metadata.jsonl}
            reward: remote
            remote: {url: "http://127.0.0.1:18085", metrics: [score, strict]}
            metric: strict
          pick:
            prompts: {kind: file, train: data/pick/train.txt, test: data/pick/test.txt}
            reward: pickscore
            pickscore: {model: models/PickScore_v1}
        teachers: {text: {task: text}, geneval: {task: geneval}, pick: {task: pick}}
        router: {rules: [{task: text, teacher: text}, {task: geneval, teacher: geneval},
                         {task: pick, teacher: pick}]}
        cold_start: {method: none}
        """))
    sets = build_prompt_sets(spec, root=tmp_path)
    assert {t: {s: len(p) for s, p in splits.items()} for t, splits in sets.items()} == {
        "geneval": {"train": 2, "test": 1}, "pick": {"train": 2, "test": 1},
        "text": {"train": 4, "val": 64, "test": 2}}
    out = tmp_path / "out"
    out.mkdir()
    write_prompt_sets(sets, out)
    assert read_prompts(out, "geneval", "train") == sets["geneval"]["train"]
    assert read_prompts(out, "pick", "test")[0].text == "a red bicycle"
    router = Router.from_spec(spec)
    assert [router.route(p) for p in read_prompts(out, "geneval", "train")] == ["geneval", "geneval"]
    assert router.route(read_prompts(out, "pick", "train")[0]) == "pick"
    with pytest.raises(FileNotFoundError, match="train_metadata.jsonl not found"):
        build_prompt_sets(spec, root=tmp_path / "elsewhere")
