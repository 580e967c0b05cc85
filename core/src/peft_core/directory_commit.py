"""Files in a directory that change as one unit: staged, committed by one rename, then rolled forward.

Hugging Face PEFT's format fixes the file names (``adapter_config.json`` beside
``adapter_model.safetensors``, members of a stack in subfolders), so a new adapter cannot replace the
old one by renaming a directory over it, and renaming its files one after the other leaves, for an
instant or for good after a kill, one save's config beside another save's weights. Instead a save

1. writes every new file in full into a fresh hidden folder inside the directory (``.peft-staging-*``),
   flushed to disk;
2. commits them with one atomic rename of that folder to ``.peft-commit``;
3. rolls forward: moves each committed file into its place, deletes the files the save removes, and
   removes ``.peft-commit``.

A reader finds each file through ``.peft-commit`` first (:func:`committed_path`), so it reads all the old
files before step 2 and all the new ones from then on, even after a kill in the middle of step 3. The
next save into the directory first finishes such a roll-forward and deletes the staging folders of
killed saves. Writers hold an exclusive lock on the directory and readers a shared one (``flock`` on the
directory itself, so no lock file is left behind): concurrent saves end with one writer's files whole, and
a reader never reads across a save.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from peft_core.errors import PeftError

try:
    import fcntl
except ImportError:  # Windows: saves are ordered within this process only
    fcntl = None

COMMIT_DIR = ".peft-commit"
STAGING_PREFIX = ".peft-staging-"
REMOVE_LIST = ".peft-remove.json"  # in a commit: the relative paths the save deletes
# Temporaries of the single-file renames earlier versions used (mkstemp's ".<name>.<8 chars>.tmp").
_OLD_TEMPORARY = re.compile(r"\.[^/]+\.(?:json|safetensors)\.[a-z0-9_]{8}\.tmp")

_held = threading.local()  # realpath -> "shared" / "exclusive": the locks this thread holds
_process_locks: dict[str, threading.Lock] = {}  # without fcntl: one lock per directory, this process only
_process_locks_guard = threading.Lock()


def step(name: str) -> None:
    """A point between two steps of a save; tests that kill a save at each step in turn replace this."""


# --- locking ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, exclusive: bool) -> Iterator[None]:
    """Hold the directory's lock for the ``with`` block: shared for readers, exclusive for writers.

    A thread that already holds the directory's lock gets it again at no cost (a writer that reads, a
    stack loaded member by member). Where the filesystem refuses locks (some network mounts) saves
    and loads go on unordered, as they would without this library's help.
    """
    key = os.path.realpath(directory)
    held = _held.__dict__
    if key in held:
        if exclusive and held[key] == "shared":
            raise PeftError(
                f"{directory}: a thread reading the directory cannot start writing to it. Finish reading "
                f"(leave the load's block) before saving there, or save into another directory."
            )
        yield
        return
    held[key] = "exclusive" if exclusive else "shared"
    try:
        with _os_lock(key, exclusive):
            yield
    finally:
        del held[key]


@contextlib.contextmanager
def _os_lock(path: str, exclusive: bool) -> Iterator[None]:
    if fcntl is None:
        if not exclusive:
            yield
            return
        with _process_locks_guard:
            lock = _process_locks.setdefault(path, threading.Lock())
        with lock:
            yield
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not a directory we can open (a Hub repo id, no permission): nothing to order
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks (some network mounts)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- writing ---------------------------------------------------------------------------------------


FileWriter = Callable[[str], None]  # writes one file at the path it is given


class Staging:
    """The folder a save writes its new files into (relative paths as in the target directory), and the
    files it deletes from the target."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.removed: set[str] = set()

    def remove(self, relative: str) -> None:
        self.removed.add(relative)


@contextlib.contextmanager
def staged_commit(directory: str | os.PathLike, also_lock: Iterable[str] = ()) -> Iterator[Staging]:
    """A fresh staging folder for the new files; when the block ends without an exception they replace the
    old ones, and the files the block named for removal are deleted, all as one unit. ``also_lock``:
    subfolders whose readers must wait too (the members of a stack, which load from their own folder)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    subfolders = sorted({root / sub for sub in also_lock})  # always in this order: two writers cannot deadlock
    with contextlib.ExitStack() as locks:
        locks.enter_context(directory_lock(root, exclusive=True))
        for sub in subfolders:
            sub.mkdir(parents=True, exist_ok=True)
            locks.enter_context(directory_lock(sub, exclusive=True))
        recover(root)
        for sub in subfolders:
            _delete_temporaries(sub)
        staging = Staging(Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root)))
        try:
            yield staging
            if staging.removed:
                (staging.path / REMOVE_LIST).write_text(json.dumps(sorted(staging.removed)))
            _sync_tree(staging.path)
            step("staged")
            os.rename(staging.path, root / COMMIT_DIR)  # the commit point
            _fsync_directory(root)
        except BaseException:
            shutil.rmtree(staging.path, ignore_errors=True)
            raise
        step("committed")
        roll_forward(root)


def commit_files(
    directory: str | os.PathLike, files: Mapping[str, FileWriter], also_lock: Iterable[str] = ()
) -> None:
    """Write ``files`` (relative path -> writer) into ``directory`` as one unit."""
    with staged_commit(directory, also_lock) as staging:
        write_files(staging, files)


def write_files(staging: Staging, files: Mapping[str, FileWriter]) -> None:
    for relative, write in files.items():
        path = staging.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(path))
        step(f"wrote {relative}")


def roll_forward(directory: str | os.PathLike) -> None:
    """Finish a committed save: move its files into place, delete what it removes, drop the commit."""
    root = Path(directory)
    commit = root / COMMIT_DIR
    if not commit.is_dir():
        return
    removed = _removed(commit)
    moved_into = {root}
    for source in sorted(p for p in commit.rglob("*") if p.is_file() and p.name != REMOVE_LIST):
        target = root / source.relative_to(commit)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        moved_into.add(target.parent)
        step(f"moved {source.relative_to(commit)}")
    for relative in removed:
        (root / relative).unlink(missing_ok=True)
    for folder in moved_into:
        _fsync_directory(folder)
    step("rolled forward")
    shutil.rmtree(commit)  # not flushed: if the removal is lost, the next save finds the commit emptied


def recover(directory: str | os.PathLike) -> None:
    """Clean up after killed saves: finish a committed one, delete the staging folders and temporary
    files of the others. Only under the directory's exclusive lock: no live save owns them then."""
    root = Path(directory)
    roll_forward(root)
    _delete_temporaries(root)


def _delete_temporaries(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif _OLD_TEMPORARY.fullmatch(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)


def leftovers(directory: str | os.PathLike) -> list[str]:
    """The names of killed saves' leftovers in ``directory`` (staging folders, a commit, temporaries)."""
    return sorted(
        entry.name for entry in Path(directory).iterdir()
        if entry.name == COMMIT_DIR or entry.name.startswith(STAGING_PREFIX) or _OLD_TEMPORARY.fullmatch(entry.name)
    )


# --- reading ---------------------------------------------------------------------------------------


def finish_interrupted_save(directory: str | os.PathLike) -> None:
    """Roll forward a save that was killed after its commit, in ``directory`` or in the parent it was saved to
    (a stack member's folder), when no save is running and this process may write there: readers of other
    libraries, which know nothing of the commit, then see whole files too. Best effort: where it cannot,
    this library's readers still read the committed files (:func:`committed_path`)."""
    root = Path(directory)
    for folder in (root, root.parent):
        commit = folder / COMMIT_DIR
        if fcntl is None or not commit.is_dir() or os.path.realpath(folder) in _held.__dict__:
            continue
        # As a save would: the folder, then the member folders the commit writes into, none waited for.
        try:
            members = sorted(folder / entry.name for entry in os.scandir(commit) if entry.is_dir())
        except OSError:  # a save finished it meanwhile
            continue
        with contextlib.ExitStack() as held:
            if all(_lock_now(path, held) for path in [folder, *members]):
                with contextlib.suppress(OSError):  # a read-only folder
                    roll_forward(folder)


def _lock_now(path: Path, held: contextlib.ExitStack) -> bool:
    """Take ``path``'s exclusive lock if no one holds it (kept until ``held`` closes); whether it was taken."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return not path.exists()  # a member folder the commit creates: no reader can be in it
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def committed_path(directory: str | os.PathLike, relative: str) -> Path | None:
    """Where to read ``relative`` of ``directory`` as of the last committed save, or None if absent.

    A save's commit lies in the folder it saved to, which for a stack member is the parent of the
    member's own folder, so both are looked at.
    """
    root = Path(directory)
    for commit, inner in ((root / COMMIT_DIR, relative), (root.parent / COMMIT_DIR, f"{root.name}/{relative}")):
        if commit.is_dir():
            if inner in _removed(commit):
                return None
            if (commit / inner).is_file():
                return commit / inner
    path = root / relative
    return path if path.is_file() else None


def _removed(commit: Path) -> list[str]:
    try:
        return json.loads((commit / REMOVE_LIST).read_text())
    except (OSError, ValueError):
        return []


# --- durability ------------------------------------------------------------------------------------


def _sync_tree(root: Path) -> None:
    """Give every file under ``root`` the mode a new file gets (writers such as safetensors create private
    temporaries, which a serving process running as another user could not read), then flush the files and
    the folders holding them to disk, before they are committed."""
    mode = _new_file_mode(root)
    for path in sorted(root.rglob("*"), reverse=True):  # files before the folders that hold them
        if path.is_file():
            path.chmod(mode)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_directory(path)
    _fsync_directory(root)


def _new_file_mode(folder: Path) -> int:
    """The permissions the process's umask gives a new file (read without changing the umask, which is
    process-wide and would race with other threads)."""
    probe = folder / ".peft-mode"
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def _fsync_directory(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory to flush it; its renames are journaled
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
