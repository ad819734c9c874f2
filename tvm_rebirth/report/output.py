"""Text tables and output files: every file a command writes (plan, weights, JSON report,
library) is checked with ``output_path`` before any work and written with ``write_atomic``.

The rules, one place for every command:

* a symlink is written through: the file it points at is replaced, the link stays;
* only regular files are replaced: a directory, a device (``/dev/null``, ``/dev/full``), a
  pipe or a socket at the path is an error;
* an input of the same command (the model, the plan, the weights, the calibration array) is
  never overwritten;
* the folder must exist and take a new file: a missing, read-only or full folder is a
  one-line error naming the path, before the command starts working;
* the bytes go to a temporary ``.<name>.<random>.tmp`` beside the target, then are renamed
  over it; on any failure (a full disk, Ctrl-C) the temporary file is removed and the old
  file is untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile

from ..errors import RebirthError


def table(rows, header) -> str:
    """Left-aligned columns under a dashed header line."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _refuse_non_regular(path, real) -> None:
    """RebirthError when something other than a regular file sits at ``real``."""
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise RebirthError(f"{path}: cannot write here ({err.strerror})") from None
    if stat.S_ISDIR(mode):
        raise RebirthError(f"{path}: is a directory; give a file name to write")
    if not stat.S_ISREG(mode):
        raise RebirthError(f"{path}: not a regular file (a device, pipe or socket); "
                           "refusing to replace it")


def _same_file(a, b) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def output_path(path, inputs=None) -> str:
    """The real file that output ``path`` names (symlinks resolved), checked before any work:
    a regular file or nothing at it, not one of ``inputs`` ({what: path} of the command's
    input files; None values are skipped), in an existing folder where a file can be
    created. RebirthError naming ``path`` otherwise."""
    path = os.fspath(path)
    if not path:
        raise RebirthError("an output path is empty")
    real = os.path.realpath(path)
    _refuse_non_regular(path, real)
    for what, source in (inputs or {}).items():
        if source and os.path.exists(source) and _same_file(source, real):
            raise RebirthError(f"{path}: is this command's {what} ({source}); refusing to "
                               "overwrite an input, choose another output path")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise RebirthError(f"{path}: folder {folder} does not exist")
    try:  # the one honest test of "can a file be created here" (read-only mount, no inodes)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(real)}.",
                                         suffix=".tmp"):
            pass
    except OSError as err:
        raise RebirthError(f"{path}: cannot write in {folder} ({err.strerror})") from None
    return real


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside the file ``path`` names (through symlinks) for a writer
    to fill; renames it over the target when the block ends normally, removes it on any
    exception (OSError becomes a one-line RebirthError naming ``path``)."""
    path = os.fspath(path)
    real = os.path.realpath(path)
    _refuse_non_regular(path, real)
    folder, name = os.path.split(real)
    suffix = os.path.splitext(name)[1]  # writers that pick a format by suffix (.so) keep it
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=f".tmp{suffix}")
    except OSError as err:
        raise RebirthError(f"{path}: cannot write in {folder} ({err.strerror})") from None
    os.close(fd)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(real).st_mode)  # keep an existing file's permissions
        except FileNotFoundError:
            mode = 0o644  # mkstemp creates 0600; outputs are for everyone
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except OSError as err:
        raise RebirthError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path, data) -> None:
    """Write ``data`` (bytes or str, UTF-8) to the file ``path`` names: all of it or, on any
    failure, nothing (the old file untouched, no temporary file left)."""
    if isinstance(data, str):
        data = data.encode()
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def install_file(source, path) -> None:
    """Copy the finished file ``source`` to ``path`` by the same rules as ``write_atomic``:
    for writers (a library export) that cannot report a full disk as such themselves."""
    with replacing(path) as tmp:
        shutil.copyfile(source, tmp)


def write_text(path, text: str) -> None:
    write_atomic(path, text)


def write_json(path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
