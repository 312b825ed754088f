"""Directories that appear whole: built under a hidden temporary name beside their target and
renamed into place, so a crash never leaves a half-written export, adapter or ``best/``.

    >>> import os, tempfile
    >>> parent = tempfile.mkdtemp()
    >>> for text in ("first", "second"):
    ...     tmp = fresh_dir(parent, ".out.tmp-")
    ...     with open(os.path.join(tmp, "f"), "w") as f:
    ...         _ = f.write(text)
    ...     replace_dir(tmp, os.path.join(parent, "out"))
    >>> open(os.path.join(parent, "out", "f")).read(), sorted(os.listdir(parent))
    ('second', ['out'])
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile


def fresh_dir(parent: str, prefix: str) -> str:
    """A new, uniquely named directory in ``parent`` with the mode ``os.mkdir`` gives under the
    umask (``tempfile.mkdtemp`` makes it owner-only, which the renamed directory would keep,
    so other users could not read it)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(6))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished directory ``tmp`` to ``target``; an existing ``target`` is moved
    aside first and deleted only once ``tmp`` is in its place."""
    tmp, target = os.fspath(tmp), os.fspath(target)
    if not os.path.exists(target):
        os.rename(tmp, target)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-",
                           dir=os.path.dirname(os.path.abspath(target)))
    os.rename(target, os.path.join(old, "d"))
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
