"""What the readers take from data they do not trust, and the names of what they leave out.

Every reader of stored data (`datatools.prepare_data`, the `arrayrecord:` and `wds:` sources, `datatools.index_tars`,
`datatools.filter_clip_score`, `datatools.train_tokenizer`) holds an image or a text to these limits before it reads or
decodes it, so a hostile sample costs bounded memory and time: it is left out and counted under one of
`REASONS`, and the counts reach dataset.json (prepare_data), the index (index_tars) and the console.
"""

from __future__ import annotations

import errno
import os

# Pillow's own decompression-bomb threshold (its default Image.MAX_IMAGE_PIXELS): 89.5 megapixels, 268 MB as RGB.
# Pillow only warns between it and twice it, and decodes; the readers refuse anything above it, from the header.
MAX_IMAGE_PIXELS = 89_478_485
# A stored image file or tar member: an 89.5 MP image compresses below this.
MAX_IMAGE_BYTES = 256 << 20
# A caption or a sample's metadata (LAION's .txt and .json members are under 2 KB).
MAX_TEXT_BYTES = 1 << 20

UNDECODABLE = "undecodable"  # not an image Pillow can decode: zero bytes, truncated, not an image at all
TOO_MANY_PIXELS = "too_many_pixels"  # a decompression bomb: its header says more than MAX_IMAGE_PIXELS
TOO_LARGE = "too_large"  # a file or member over MAX_IMAGE_BYTES (image) or MAX_TEXT_BYTES (text)
UNSAFE_NAME = "unsafe_name"  # a tar member named by an absolute path or with a '..' component
LINK = "link"  # a tar member that is a symbolic or hard link
NOT_A_FILE = "not_a_file"  # a device, a FIFO: a tar member or a listed file that is no regular file
NO_IMAGE = "no_image"  # a sample without an image member
OUTSIDE_ROOT = "outside_root"  # a path read out of a file (a table's row) that resolves outside the folder named
REASONS = (UNDECODABLE, TOO_MANY_PIXELS, TOO_LARGE, UNSAFE_NAME, LINK, NOT_A_FILE, NO_IMAGE, OUTSIDE_ROOT)


class ImageTooLarge(ValueError):
  """An image whose header gives more than MAX_IMAGE_PIXELS pixels; never decoded."""

  def __init__(self, width: int, height: int):
    super().__init__(
      f"{width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} that readers decode "
      "(data/limits.py MAX_IMAGE_PIXELS): a decompression bomb, or an image too large to train on"
    )


class TextTooLarge(ValueError):
  """A caption longer than MAX_TEXT_BYTES."""

  def __init__(self, size: int):
    super().__init__(
      f"a caption of {size:,} bytes, over the {MAX_TEXT_BYTES:,} that readers take (data/limits.py MAX_TEXT_BYTES)"
    )


def check_pixels(width: int, height: int) -> None:
  if width * height > MAX_IMAGE_PIXELS:
    raise ImageTooLarge(width, height)


def text_too_large(text: str) -> bool:
  """Whether `text` holds more than MAX_TEXT_BYTES bytes as UTF-8 (encoded only when it could)."""
  return len(text) > MAX_TEXT_BYTES or (
    len(text) > MAX_TEXT_BYTES // 4 and len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES
  )


def unsafe_name(name: str) -> bool:
  """Whether an archive member's name could point outside the folder it would be extracted to."""
  return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def resolve_inside(path: str, root: str, folders: dict[str, str] | None = None) -> str | None:
  """`path` with its folders resolved (symbolic links and '..' at every component; its last component as named,
  for the reader's own policy on a file that is a link), when that lies in the resolved folder `root` or below
  it; None when it lies outside (OUTSIDE_ROOT), or cannot be resolved (a NUL byte, a folder changed while it was
  resolved): so a path that a table or an annotation file names is listed only inside the folder the user named.
  A listing's check: a reader opens the path with `open_inside`, which reads what it checks. `folders` caches the
  resolved folders, for a listing of many files in few folders."""
  head, name = os.path.split(path)
  try:
    if name in ("", ".", ".."):
      resolved = os.path.realpath(path)
    else:
      folders = {} if folders is None else folders
      if head not in folders:
        folders[head] = os.path.realpath(head or ".")
      resolved = os.path.join(folders[head], name)
  except (OSError, ValueError):  # ValueError: a NUL byte; OSError: EINVAL from a link replaced while it was read
    return None
  return resolved if resolved == root or resolved.startswith(os.path.join(root, "")) else None


MAX_LINKS = 40  # the symbolic links one path's walk follows, as Linux's own lookup (ELOOP past them)
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC  # O_NONBLOCK: a FIFO would wait for a writer


def _parts(path: str) -> list[str]:
  return [part for part in path.split("/") if part not in ("", ".")]


class _Walk:
  """Where a walk stands: the folder's components from '/' (`names`) and the descriptors of the folders on the way
  (`fds`, one per depth, '/' first), each opened through its parent's descriptor with O_NOFOLLOW, so that a folder
  swapped for a link on the way is read as the link it has become. The folders above `root`, where a walk starts,
  are opened by name when a '..' climbs to them: they are the user's, above the folder named."""

  def __init__(self, start: str):
    self.names = _parts(start)
    self.fds: list[int | None] = [None] * len(self.names) + [os.open(start, _FOLDER & ~os.O_NOFOLLOW)]

  def fd(self) -> int:
    if self.fds[-1] is None:
      self.fds[-1] = os.open("/" + "/".join(self.names), _FOLDER & ~os.O_NOFOLLOW)
    return self.fds[-1]

  def up(self) -> None:
    if self.names:
      self._close(self.fds.pop())
      self.names.pop()

  def to_top(self) -> None:
    while self.names:
      self.up()
    self.fd()

  def down(self, name: str, fd: int) -> None:
    self.names.append(name)
    self.fds.append(fd)

  def inside(self, root_names: list[str]) -> bool:
    return self.names[: len(root_names)] == root_names

  def close(self) -> None:
    for fd in self.fds:
      self._close(fd)
    self.fds = []

  @staticmethod
  def _close(fd: int | None) -> None:
    if fd is not None:
      os.close(fd)


def open_inside(path: str, root: str, follow_last_link: bool = False) -> int | str:
  """A read-only descriptor of the file `path` (relative to the working directory, or absolute), or the REASONS entry
  it is refused for: OUTSIDE_ROOT when it lies outside the resolved folder `root`, LINK when its last component is a
  symbolic link (followed, with `follow_last_link`, to a file inside `root` only). The path is walked component by
  component from `root`'s descriptor (from '/' when it does not start with `root`), each folder opened through its
  parent's with O_NOFOLLOW and a link's target walked in its place: the file opened is the one whose folders were
  checked, whatever is renamed or linked meanwhile (the race of a check by name and an open by name). The file is
  opened non-blocking (a FIFO waits for no writer); the caller checks what it is. OSError when a component is
  missing or cannot be opened, or the links run past MAX_LINKS; ValueError for a NUL byte."""
  if "\0" in path:
    raise ValueError(f"{path!r}: a NUL byte in a path")
  path = os.path.join(os.getcwd(), path)
  root_names = _parts(root)
  start = root if path.startswith(os.path.join(root, "")) else "/"
  pending = _parts(path[len(start) :] if start == root else path)
  walk, links, followed_last = _Walk(start), 0, False
  try:
    while pending:
      name = pending.pop(0)
      if name == "..":
        walk.up()
        continue
      try:
        if pending:
          walk.down(name, os.open(name, _FOLDER, dir_fd=walk.fd()))
          continue
        if not walk.inside(root_names):
          return LINK if followed_last else OUTSIDE_ROOT
        return os.open(name, _FILE, dir_fd=walk.fd())
      except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
          raise
        target = _link_target(name, walk.fd(), e)
      if not pending and not follow_last_link:
        return LINK
      links += 1
      if links > MAX_LINKS:
        raise OSError(errno.ELOOP, f"more than {MAX_LINKS} symbolic links", path)
      followed_last = followed_last or not pending
      if target.startswith("/"):
        walk.to_top()
      pending[:0] = _parts(target)
    return NOT_A_FILE if walk.inside(root_names) else OUTSIDE_ROOT  # it names a folder
  finally:
    walk.close()


def _link_target(name: str, dir_fd: int, error: OSError) -> str:
  """The target of the link `name` in the folder `dir_fd`; `error` (why it would not open as a folder or file)
  when it is no link (a file where a folder is named)."""
  try:
    return os.readlink(name, dir_fd=dir_fd)
  except OSError:
    raise error from None
