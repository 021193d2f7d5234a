"""The settings reference, generated from the config dataclasses in flowers/config.py.

A mkdocs hook (mkdocs.yml `hooks:`): on docs/reference/settings.md it replaces the marker with one
table per section, every key with its type, its default and its description. A key's description is
the comment written beside it in flowers/config.py (on the lines just above the field, or at the end
of its line), read with `tokenize` and `ast` from the source, so a new key is documented where it is
added and cannot be left out of the site. tests/unit/test_docs_reference.py calls `settings_rows`.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

from flowers import config

MARKER = "<!-- generated: settings reference -->"
PAGE = "reference/settings.md"


class Setting(NamedTuple):
    section: str
    key: str
    type: str
    default: Any
    description: str


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the comment is the whole line)."""
    found = {}
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            whole_line = not lines[row - 1][:token.start[1]].strip()
            found[row] = (token.string.lstrip("#").strip(), whole_line)
    return found


def _field_descriptions(source: str, class_name: str) -> dict[str, str]:
    """A dataclass's field -> the comment beside it (the comment lines just above, else its line's)."""
    comments = _comments(source)
    classes = [node for node in ast.parse(source).body
               if isinstance(node, ast.ClassDef) and node.name == class_name]
    descriptions = {}
    for node in classes[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row in comments and comments[row][1]:
            above.insert(0, comments[row][0])
            row -= 1
        inline = comments.get(node.lineno)
        text = " ".join(above) if above else (inline[0] if inline and not inline[1] else "")
        descriptions[node.target.id] = text
    return descriptions


def settings_rows() -> list[Setting]:
    """Every key of every section of config.SECTIONS, in the order the dataclasses declare them."""
    source = Path(config.__file__).read_text()
    rows = []
    for section, cls in config.SECTIONS.items():
        descriptions = _field_descriptions(source, cls.__name__)
        for field in dataclasses.fields(cls):
            rows.append(Setting(section, field.name, str(field.type), field.default,
                                descriptions.get(field.name, "")))
    return rows


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _cell(text: str) -> str:
    """Markdown table cell text: a `|` would end the cell, a `<` could open an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


def render_markdown() -> str:
    """The reference: one section heading and table per config section, then the removed keys."""
    rows = settings_rows()
    out = []
    for section, cls in config.SECTIONS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out += [f"## `[{section}]`", "", _cell(doc), "",
                "| key | type | default | description |", "| --- | --- | --- | --- |"]
        out += [f"| `{row.section}.{row.key}` | {row.type} | `{_toml(row.default)}` | "
                f"{_cell(row.description)} |" for row in rows if row.section == section]
        out.append("")
    if config.REMOVED_KEYS:
        out += ["## Removed keys", "",
                "Refused in experiment files and `--set`, with the reason; dropped when an older "
                "run's `config.json` is read, so its model still evaluates and exports.", "",
                "| key | why |", "| --- | --- |"]
        out += [f"| `{key}` | {_cell(reason)} |" for key, reason in config.REMOVED_KEYS.items()]
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs calls it by this name
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lacks the marker {MARKER!r} the settings reference replaces")
    return markdown.replace(MARKER, render_markdown())
