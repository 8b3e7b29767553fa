"""One name per concept across commands; the other spellings still work, unlisted in ``--help``.

Typer shows every name an option has, so the older spellings are translated here, before parsing:
an exact token (``--out DIR`` or ``--out=DIR``) becomes the canonical one. No command uses an alias
as a name of its own, so the translation never changes what a command line means.
"""

from __future__ import annotations

#: alias -> canonical option (one or more tokens)
ALIASES: dict[str, tuple[str, ...]] = {
    "--out": ("--output",),
    "--steps": ("--max-steps",),
    "--size": ("--image-size",),
    "--lora-rank": ("--rank",),
    "--structure": ("--label",),
    "--bf16": ("--precision", "bf16"),
    "--sam": ("--sam-model",),
}


def canonical_argv(argv: list[str]) -> list[str]:
    """``argv`` with every alias spelled the canonical way (arguments after ``--`` untouched)."""
    out: list[str] = []
    for i, tok in enumerate(argv):
        if tok == "--":
            return out + argv[i:]
        name, eq, value = tok.partition("=")
        if name in ALIASES:
            new = ALIASES[name]
            out += [new[0] + "=" + value] if eq else list(new)
        else:
            out.append(tok)
    return out
