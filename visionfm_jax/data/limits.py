"""What the readers take from data they do not trust, and the names of what they leave out.

Every reader of stored data (`datatools.prepare_data`, the `arrayrecord:` and `wds:` sources, `datatools.index_tars`,
`datatools.filter_clip_score`, `datatools.train_tokenizer`) holds an image or a text to these limits before it reads or
decodes it, so a hostile sample costs bounded memory and time: it is left out and counted under one of
`REASONS`, and the counts reach dataset.json (prepare_data), the index (index_tars) and the console.
"""

from __future__ import annotations

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
    super().__init__(f"{width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} that readers decode "
                     "(data/limits.py MAX_IMAGE_PIXELS): a decompression bomb, or an image too large to train on")


class TextTooLarge(ValueError):
  """A caption longer than MAX_TEXT_BYTES."""

  def __init__(self, size: int):
    super().__init__(f"a caption of {size:,} bytes, over the {MAX_TEXT_BYTES:,} that readers take "
                     "(data/limits.py MAX_TEXT_BYTES)")


def check_pixels(width: int, height: int) -> None:
  if width * height > MAX_IMAGE_PIXELS:
    raise ImageTooLarge(width, height)


def text_too_large(text: str) -> bool:
  """Whether `text` holds more than MAX_TEXT_BYTES bytes as UTF-8 (encoded only when it could)."""
  return len(text) > MAX_TEXT_BYTES or (len(text) > MAX_TEXT_BYTES // 4
                                        and len(text.encode("utf-8", "surrogatepass")) > MAX_TEXT_BYTES)


def unsafe_name(name: str) -> bool:
  """Whether an archive member's name could point outside the folder it would be extracted to."""
  return name.startswith("/") or ".." in name.replace("\\", "/").split("/")


def resolve_inside(path: str, root: str, folders: dict[str, str] | None = None) -> str | None:
  """`path` with its folders resolved (symbolic links and '..' at every component; its last component as named,
  for the reader's own policy on a file that is a link), when that lies in the resolved folder `root` or below
  it; None when it lies outside (OUTSIDE_ROOT): so a path that a table or an annotation file names reads no byte
  outside the folder the user named. `folders` caches the resolved folders, for a listing of many files in few
  folders."""
  head, name = os.path.split(path)
  if name in ("", ".", ".."):
    resolved = os.path.realpath(path)
  else:
    folders = {} if folders is None else folders
    if head not in folders:
      folders[head] = os.path.realpath(head or ".")
    resolved = os.path.join(folders[head], name)
  return resolved if resolved == root or resolved.startswith(os.path.join(root, "")) else None
