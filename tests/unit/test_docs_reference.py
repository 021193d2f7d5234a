"""The generated settings reference (docs/hooks/settings_reference.py) documents every config key.

The reference is made from flowers/config.py when the site builds, so these tests call its generator
directly: every key of every section, each with a description (the comment beside the field), and no
removed key listed as a setting. In-process and pure: no keras, no mkdocs.
"""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from flowers import config

# the checkout's docs/ (the hook is not part of the installed package)
HOOK = Path(__file__).resolve().parents[2] / "docs" / "hooks" / "settings_reference.py"


def _reference():
    spec = importlib.util.spec_from_file_location("settings_reference", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _reference()


@pytest.mark.parametrize("section", list(config.SECTIONS))
def test_every_config_key_is_in_the_settings_reference_with_a_description(reference, section):
    rows = {row.key: row for row in reference.settings_rows() if row.section == section}
    fields = dataclasses.fields(config.SECTIONS[section])
    assert list(rows) == [f.name for f in fields], f"the [{section}] reference differs from config.py"
    assert all(rows[f.name].default == f.default for f in fields)
    undocumented = [key for key, row in rows.items() if not row.description]
    assert not undocumented, (f"[{section}] keys without a comment beside them in flowers/config.py "
                              f"(the reference's description): {undocumented}")
    page = reference.render_markdown()
    assert not [key for key in rows if f"| `{section}.{key}` |" not in page]


def test_no_removed_key_is_documented_as_a_setting(reference):
    listed = {f"{row.section}.{row.key}" for row in reference.settings_rows()}
    assert not listed & set(config.REMOVED_KEYS)
    page = reference.render_markdown()
    settings_part = page.split("## Removed keys")[0]
    assert not [key for key in config.REMOVED_KEYS if f"`{key}`" in settings_part]


def test_a_field_comment_is_read_from_above_or_beside_it(reference):
    source = (
        "class Section:\n"
        "    # first line\n"
        "    # second line\n"
        "    above: int = 1\n"
        "    beside: str = 'a#b'  # the comment at the end\n"
        "    bare: bool = True\n"
        "\n"
        "    # a comment after a blank line, above a method\n"
        "    def method(self): ...\n"
    )
    assert reference._field_descriptions(source, "Section") == {
        "above": "first line second line", "beside": "the comment at the end", "bare": ""}
