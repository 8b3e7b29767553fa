"""Every command block of the README names real commands and flags (checked against the CLI itself), and
the README stays a guide: short, and silent about the project's own history."""

import re
from pathlib import Path

import typer

from medfound.cli import app

README = Path(__file__).parent.parent / "README.md"


def _commands(text: str) -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    out = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("medfound "):
                out.append(line.split()[1:])
    return out


def _check_commands(cmds: list[list[str]]) -> None:
    root = typer.main.get_command(app)
    for words in cmds:
        cmd, i = root, 0
        while hasattr(cmd, "commands") and i < len(words) and words[i] in cmd.commands:
            cmd, i = cmd.commands[words[i]], i + 1
        assert not hasattr(cmd, "commands"), f"`medfound {' '.join(words)}`: no such command"
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
        for w in words[i:]:
            if w.startswith("-"):
                assert w.split("=")[0] in known, f"`medfound {' '.join(words[:i])}` has no option {w}"


def test_readme_commands_and_flags_exist():
    cmds = _commands(README.read_text())
    assert len(cmds) >= 10
    _check_commands(cmds)


def test_guides_name_real_commands_and_say_each_thing_once():
    pages = sorted((README.parent / "docs" / "guide").glob("*.md"))
    assert len(pages) >= 5
    for page in pages:
        text = page.read_text()
        assert len(text.splitlines()) < 400, page.name
        paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 80]
        assert len(paragraphs) == len(set(paragraphs)), f"{page.name} repeats a paragraph"
        _check_commands(_commands(text))


def test_readme_is_a_short_guide_without_history():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    for word in (r"\bsession \d", r"\bstage \d", r"\bbefore\b.*\bnow\b", r"\bwas rerun\b", r"\bthe row below\b"):
        assert not re.search(word, text, flags=re.I), word
