"""Keeps the CLI reference's placeholders visible: a mkdocs hook (mkdocs.yml `hooks:`).

mkdocs-click writes each command's help text into the page as Markdown, so a placeholder such as
`exports/<experiment>/v<N>/` reaches the HTML as unknown tags that a browser hides ("exports//v/").
After the page is rendered, every `<name>` that is not an HTML tag is written as text again.
"""

from __future__ import annotations

import re

PAGE = "reference/cli.md"
# the tags Markdown renders (and the theme's own); anything else in angle brackets is a placeholder
HTML_TAGS = {"a", "p", "code", "pre", "strong", "em", "ul", "ol", "li", "table", "thead", "tbody",
             "tr", "th", "td", "span", "div", "h1", "h2", "h3", "h4", "h5", "h6", "br", "hr",
             "blockquote", "dl", "dt", "dd", "sup", "sub", "kbd", "script", "style", "img", "button",
             "nav", "label", "input", "details", "summary"}
PLACEHOLDER = re.compile(r"<([A-Za-z][\w-]*)>")


def escape_placeholders(html: str) -> str:
    """`<experiment>` -> `&lt;experiment&gt;`; real tags (`<p>`, `<code>`, ...) stay."""
    return PLACEHOLDER.sub(
        lambda m: m.group(0) if m.group(1).lower() in HTML_TAGS else f"&lt;{m.group(1)}&gt;", html)


def on_page_content(html: str, page, config, files) -> str:  # mkdocs calls it by this name
    return escape_placeholders(html) if page.file.src_uri == PAGE else html
