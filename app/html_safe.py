"""Turning untrusted text (users, OSM tags, model output) into HTML or Markdown that shows as text.

Every string that reaches the page goes through one of these. Popups inside the map are built
from text nodes in JavaScript (see `map_html`), so they need no escaping here.
"""

from __future__ import annotations

import html
import json
import string
from collections.abc import Iterable, Sequence
from typing import Any

_MD_PUNCT = set(string.punctuation) - set("&<>\"'")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}


def esc(value: Any) -> str:
    """HTML-escape anything (None -> empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


def markdown_text(text: str) -> str:
    """Text for a Markdown renderer (the Chatbot) that displays exactly as typed.

    HTML specials become entities and every other ASCII punctuation gets a backslash, so
    neither raw HTML (``<img onerror>``), nor links/images (``![](http://...)``), nor emphasis
    can be injected by a user, an OSM tag or the model. Newlines are kept.
    """
    out = []
    for ch in text:
        if ch in _ENTITIES:
            out.append(_ENTITIES[ch])
        elif ch in _MD_PUNCT:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def json_for_script(obj: Any) -> str:
    """JSON that is safe inside ``<script>``: no ``</script>``, no ``<!--``, no U+2028."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, caption: str = "",
          empty: str = "nothing here", css_class: str = "rsvlm-table") -> str:
    """An HTML table with every cell escaped."""
    rows = list(rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    if rows:
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    else:
        body = f'<tr><td colspan="{len(headers)}"><i>{esc(empty)}</i></td></tr>'
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f'<table class="{esc(css_class)}">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
