"""The READMEs and docs/ say only what exists: every relative link resolves, every make target
and variable they quote is in the Makefile, and every flag they quote is the script's."""
import re

import pytest

import bench
import bench_web
import data
import export
import gui
import plot
import predict
import train
import web
from conftest import ROOT
from test_cli import parser_of_test_py

DOCS = [ROOT / "README.md", ROOT / "README.zh-CN.md", *sorted((ROOT / "docs").glob("*.md"))]
PARSERS = {"train.py": train.get_args_parser, "test.py": parser_of_test_py, "predict.py": predict.get_args_parser,
           "bench.py": bench.get_args_parser, "export.py": export.get_args_parser, "data.py": data.get_args_parser,
           "gui.py": gui.get_args_parser, "plot.py": plot.get_args_parser, "web.py": web.get_args_parser,
           "bench_web.py": bench_web.get_args_parser}
# The script whose flags a make target's ARGS= passes on (speedrun: train.py's, after --).
TARGET_SCRIPT = {"train": "train.py", "eval": "test.py", "predict": "predict.py", "bench": "bench.py",
                 "speedrun": "train.py", "export": "export.py", "gui": "gui.py", "plot": "plot.py", "data": "data.py",
                 "web": "web.py", "bench-web": "bench_web.py"}
# Scripts that pass what follows ` -- ` on to another script's flags.
PASSES_ON = {"bench.py": "train.py"}


def flags_of(script):
    return {s for a in PARSERS[script]()._actions for s in a.option_strings}


def quoted_flags(script, words):
    """(flag, the script it must belong to) for each flag in words given to script."""
    own, _, passed = f" {words} ".partition(" -- ")
    flags = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
    return ([(flag, script) for flag in flags.findall(own)]
            + [(flag, PASSES_ON.get(script, script)) for flag in flags.findall(passed)])


def slug(heading):
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def code_of(text):
    """The commands a page quotes: lines of fenced blocks, and inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
    lines = [ln for b in blocks for ln in b.splitlines()]
    outside = re.sub(r"```.*?```", "", text, flags=re.S)
    return lines + re.findall(r"`([^`\n]+)`", outside)


def makefile():
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z-]+):", text, re.M)), set(re.findall(r"^([A-Z0-9_]+) +\?=", text, re.M))


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # http(s), mailto
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}"
        if anchor and resolved.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", resolved.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_make_target_and_variable_quoted_exists(page):
    targets, variables = makefile()
    for line in code_of(page.read_text()):
        for command in re.findall(r"\bmake ((?:[A-Za-z0-9_-]+(?:=(?:\"[^\"]*\"|\S+))? ?)*)", line):
            for word in re.findall(r"(?:\"[^\"]*\"|\S)+", command):
                name = word.split("=")[0]
                if "=" in word:
                    assert name in variables, f"{page.name}: make variable {name} in `{line}`"
                else:
                    assert word in targets, f"{page.name}: make target {word} in `{line}`"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_flag_quoted_belongs_to_its_script(page):
    every = set().union(*(flags_of(s) for s in PARSERS))
    for line in code_of(page.read_text()):
        line = line.split(" # ")[0]
        for script, rest in re.findall(r"(\w+\.py)((?: [^|;&]*)?)", line):
            if script in PARSERS and ("python " in line or "torchrun" in line):
                for flag, owner in quoted_flags(script, rest):
                    assert flag in flags_of(owner), f"{page.name}: {owner} has no {flag} (`{line}`)"
        for target, args in re.findall(r"\bmake (\w+)[^\n]*?ARGS=\"?([^\"\n]*)", line):
            for flag, owner in quoted_flags(TARGET_SCRIPT[target], args):
                assert flag in flags_of(owner), f"{page.name}: {owner} has no {flag} (`{line}`)"
        for flag in re.fullmatch(r"(--[a-z][a-z0-9-]*)(?: \S+)?", line.strip()) and [line.split()[0]] or []:
            assert flag in every, f"{page.name}: no script has {flag}"


def test_the_readmes_link_to_each_other_at_their_top():
    english, chinese = (ROOT / "README.md").read_text(), (ROOT / "README.zh-CN.md").read_text()
    assert "(README.zh-CN.md)" in english.split("\n## ")[0]
    assert "(README.md)" in chinese.split("\n## ")[0]


def test_the_readme_is_read_in_five_minutes():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
