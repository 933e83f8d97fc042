"""Hand edits: exclude an image, add or remove a tag, replace a caption, undo an edit.

An edit is rows of the `edits` table (one per image it touches, sharing one edit id),
written as one part before the call returns, so a killed process loses no edit that was
answered. Nothing is ever rewritten: undo is a new row that cancels an edit, and the
`manifest` view (curate.store.edited_manifest_sql) applies whatever is live.
"""
from __future__ import annotations

import getpass
import threading
import uuid
from datetime import timedelta

import pyarrow as pa

from curate.schema import EDIT_ACTIONS
from curate.store import Dataset, now

IMAGE_ACTIONS = set(EDIT_ACTIONS) - {"undo"}
NEEDS_VALUE = {"add_tag", "remove_tag", "caption"}
MAX_TAG_CHARS = 200
MAX_CAPTION_CHARS = 20_000

_clock = threading.Lock()
_last = [now()]


def _stamp():
    """A timestamp later than every earlier one of this process: of two edits, the later wins."""
    with _clock:
        t = max(now(), _last[0] + timedelta(microseconds=1))
        _last[0] = t
        return t


def check_value(action: str, value: str | None) -> str | None:
    """The value to store for an action, tidied (a tag is one trimmed line), or ValueError."""
    if action not in IMAGE_ACTIONS:
        raise ValueError(f"unknown edit {action!r}; one of {', '.join(sorted(IMAGE_ACTIONS))}")
    if action not in NEEDS_VALUE:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{action} needs a text value")
    if action == "caption":
        if len(value) > MAX_CAPTION_CHARS:
            raise ValueError(f"a caption has at most {MAX_CAPTION_CHARS} characters")
        return value.strip()
    tag = value.strip()
    if not tag or len(tag) > MAX_TAG_CHARS or any(c in tag for c in ",\n\r\t"):
        raise ValueError("a tag is 1 to 200 characters on one line, without commas or tabs")
    return tag


def record(ds: Dataset, action: str, image_ids: list[str], value: str | None = None,
           editor: str | None = None) -> str:
    """Write one edit over `image_ids` (already checked to be images of the dataset); its id."""
    value = check_value(action, value)
    if not image_ids:
        raise ValueError("the edit touches no image")
    edit, n, t = uuid.uuid4().hex, len(image_ids), _stamp()
    ds.write_part("edits", pa.table({
        "edit": pa.array([edit] * n), "image_id": pa.array(image_ids), "action": pa.array([action] * n),
        "value": pa.array([value] * n, pa.string()), "editor": pa.array([editor or _login()] * n),
        "created_at": pa.array([t] * n, pa.timestamp("us", tz="UTC"))}))
    return edit


def undo(ds: Dataset, edit: str, editor: str | None = None) -> None:
    """Cancel an edit (all of its images) with a new row: the edit before it counts again."""
    ds.write_part("edits", {"edit": [uuid.uuid4().hex], "image_id": [None], "action": ["undo"], "value": [edit],
                            "editor": [editor or _login()], "created_at": [_stamp()]})


def history(ds: Dataset, limit: int = 50) -> list[dict]:
    """The latest edits, newest first: id, action, value, images touched, when, and whether undone."""
    return ds.query(
        "SELECT e.edit, any_value(e.action) AS action, any_value(e.value) AS value, count(*) AS images, "
        "any_value(e.editor) AS editor, CAST(max(e.created_at) AS VARCHAR) AS created_at, "
        "bool_or(u.value IS NOT NULL) AS undone FROM edits e "
        "LEFT JOIN (SELECT DISTINCT value FROM edits WHERE action = 'undo') u ON u.value = e.edit "
        f"WHERE e.action <> 'undo' GROUP BY e.edit ORDER BY max(e.created_at) DESC LIMIT {int(limit)}").to_pylist()


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"

