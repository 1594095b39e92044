"""Files the project writes get the mode the user's umask gives any new file.

On a shared cluster file system an export, a checkpoint or a data set is read by other people
(and their jobs) exactly when the writer's umask allows it, as for files any ordinary program
writes. Three kinds of writer do not follow the umask, and everything here is about them:

    tempfile.mkstemp / mkdtemp     create 0600 / 0700 whatever the umask: a temporary file
                                   renamed into place stays private (write_atomic instead)
    safetensors' save_file         writes through a temporary file of its own and renames it:
                                   0600 as well (follow_umask on the result)
    shutil.copy / copytree         give the copy the source's mode, not the umask's: a colleague's
                                   0644 checkpoint copied under umask 077 is readable by all
                                   (copy_file / copy_tree instead)

Standard library only: data_pipeline and checkpoint discovery import it without torch.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

_PROC_STATUS = Path("/proc/self/status")


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel shows it (Linux 4.7+)."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    # Elsewhere the only way to read it is to set it; putting it back at once leaves another
    # thread a moment in which it would create a file under 022.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give `path`, and everything under it when it is a directory, the mode a fresh file
    (0666, or 0777 if any execute bit is set) or directory (0777) gets under the umask.
    Symbolic links are left alone (their mode means nothing; chmod would reach the target)."""
    keep = ~current_umask()
    path = Path(path)

    def fix(p: Path, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111:
            p.chmod(0o777 & keep)
        else:
            p.chmod(0o666 & keep)

    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return
    fix(path, st)
    if stat.S_ISDIR(st.st_mode):
        for root, dirs, names in os.walk(path):
            for name in dirs + names:
                p = Path(root, name)
                st = p.lstat()
                if not stat.S_ISLNK(st.st_mode):
                    fix(p, st)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `path` whole or not at all: a reader finds the old file or the new one, never half
    of one. The temporary sibling is created as open() creates files (0666 less the umask),
    not as mkstemp does (0600), so the renamed file is as readable as any other."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_file(src: str | Path, dst: str | Path) -> None:
    """The bytes of `src` into `dst`, which gets the umask's mode (not `src`'s, as shutil.copy
    would give it)."""
    shutil.copyfile(src, dst)


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """A directory's files into `dst` (made if missing), files and directories with the umask's
    modes (shutil.copytree gives every copied directory its source's mode, whatever the
    copy_function)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            shutil.copyfile(item, dst / item.name)
