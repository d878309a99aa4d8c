"""Names from models and files made safe for the place they are written to.

Module paths, site names, ONNX tensor and node names come from the user's model or from a file
someone else wrote: they may hold control characters (an ANSI escape sequence that rewrites the
terminal, a NUL that makes an SVG invalid XML), Markdown syntax (``|`` that splits a table cell) or
markup (``<script>``). Every ``qtrim`` output that shows such a name passes it through one of:

* :func:`printable` -- terminal text: C0/C1 control characters, DEL and the Unicode bidirectional
  overrides become ``\\xNN`` / ``\\uNNNN`` (plain names are returned unchanged);
* :func:`markup` -- XML / HTML / SVG text and attribute values: :func:`printable`, then escaped;
* :func:`markdown` -- Markdown text and table cells: :func:`printable`, then Markdown and HTML
  syntax escaped (``|`` as ``&#124;``, so it never splits a table cell);
* :func:`one_line` -- an error or warning message on one printable line (the CLI's stderr lines);
* :func:`map_strings` -- a copy of a dataclass report (lists, tuples, dicts inside) with every
  string passed through one of the above, to render it with its own ``table()`` / ``to_markdown()``.

JSON needs none of this: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Callable
from typing import Any

__all__ = ["map_strings", "markdown", "markup", "one_line", "printable"]

# C0 controls, DEL, C1 controls, and the Unicode bidi embeddings/overrides/isolates (U+202A-202E,
# U+2066-2069) that reorder what a terminal or browser shows ("Trojan Source"), plus the line and
# paragraph separators that start a new line in some viewers.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_MARKDOWN = {
    "\\": "\\\\", "`": "\\`", "*": "\\*", "_": "\\_", "[": "\\[", "]": "\\]", "~": "\\~", "#": "\\#",
    "|": "&#124;", "<": "&lt;", ">": "&gt;", "&": "&amp;",
}
_MARKDOWN_RE = re.compile("|".join(re.escape(c) for c in _MARKDOWN))


def _code(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}"


def printable(text: Any, keep: str = "") -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN`` for Unicode bidi controls).

    Args:
        text: anything; it is turned into a string with ``str``.
        keep: control characters to leave as they are (e.g. ``"\\n"`` for multi-line text).

    Returns:
        The text, unchanged when it holds no control character.
    """
    text = str(text)
    if keep:
        return _UNSAFE.sub(lambda m: m.group() if m.group() in keep else _code(m), text)
    return _UNSAFE.sub(_code, text)


def markup(text: Any) -> str:
    """``text`` for XML, SVG or HTML (element text or a quoted attribute): :func:`printable`, then escaped."""
    return html.escape(printable(text), quote=True)


def markdown(text: Any) -> str:
    """``text`` for Markdown (a paragraph or a table cell): :func:`printable`, then its syntax escaped.

    Backslash, backtick, ``* _ [ ] ~ #`` are backslash-escaped; ``| < > &`` become the HTML entities
    ``&#124; &lt; &gt; &amp;`` (a pipe that splits no table cell, no raw HTML).
    """
    return _MARKDOWN_RE.sub(lambda m: _MARKDOWN[m.group()], printable(text))


def map_strings(obj: Any, fn: Callable[[str], str]) -> Any:
    """A copy of ``obj`` with ``fn`` applied to every string in it.

    Dataclass instances are rebuilt with :func:`dataclasses.replace`; lists, tuples and dict keys and
    values are walked; numbers, None and other objects are kept as they are.
    """
    if isinstance(obj, str):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: map_strings(getattr(obj, f.name), fn) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, list):
        return [map_strings(x, fn) for x in obj]
    if isinstance(obj, tuple):
        return tuple(map_strings(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {map_strings(k, fn): map_strings(v, fn) for k, v in obj.items()}
    return obj


def one_line(e: BaseException | str, limit: int = 400) -> str:
    """``e``'s text on one printable line: whitespace runs collapsed, control characters as ``\\xNN``,
    cut to ``limit`` characters."""
    text = printable(" ".join(str(e).split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"
