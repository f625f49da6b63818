"""Real files of the kinds that attack a data reader (for tests/integration/test_hostile_data.py and the tool tests).

`hostile_tar` writes one img2dataset-style tar holding, beside two plain samples, every hostile sample kind, and
returns what a reader must make of it: which keys it keeps (with the pixels they must decode to) and how many
samples it leaves out under each data/limits.py reason.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

CAPTION_BYTES = 200 << 20  # "a caption of hundreds of megabytes"


def png_bomb(width: int, height: int) -> bytes:
  """A valid 1-bit greyscale PNG of width x height zero pixels, written without ever holding them: a few KB
  that decode to width * height pixels (three bytes each as RGB)."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
  compressor, body = zlib.compressobj(9), []
  rows_at_once = max(1, (1 << 22) // len(row))
  for start in range(0, height, rows_at_once):
    body.append(compressor.compress(row * min(rows_at_once, height - start)))
  body.append(compressor.flush())
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")


def gradient(height: int = 24, width: int = 40) -> np.ndarray:
  """An RGB image whose every pixel differs, so that a turn or a flip shows."""
  y, x = np.mgrid[:height, :width]
  return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1).astype(np.uint8)


def jpeg(pixels: np.ndarray, **save) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format="JPEG", quality=95, **save)
  return out.getvalue()


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
  """A JPEG stored 40 x 24 whose EXIF orientation says how to turn it (6: 90 degrees clockwise, as phones do)."""
  exif = Image.Exif()
  exif[0x0112] = orientation
  return jpeg(gradient(), exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
  """A CMYK JPEG: four colour bands of pure cyan, magenta, yellow and black ink."""
  inks = np.zeros((16, 32, 4), np.uint8)
  for band in range(4):
    inks[:, band * 8 : (band + 1) * 8, band] = 255
  out = io.BytesIO()
  Image.fromarray(inks, mode="CMYK").save(out, format="JPEG", quality=100)
  return out.getvalue()


def palette_png_with_alpha() -> bytes:
  """A palette PNG whose entry 0 is transparent (tRNS): black under it, red and blue opaque beside it."""
  image = Image.new("P", (12, 8), 0)
  image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
  image.paste(1, (4, 0, 8, 8))
  image.paste(2, (8, 0, 12, 8))
  out = io.BytesIO()
  image.save(out, format="PNG", transparency=0)
  return out.getvalue()


def rgba_png() -> bytes:
  """An RGBA PNG with alpha 0, 128 and 255 over the same green."""
  pixels = np.zeros((6, 9, 4), np.uint8)
  pixels[..., 1] = 200
  pixels[:, :3, 3], pixels[:, 3:6, 3], pixels[:, 6:, 3] = 0, 128, 255
  out = io.BytesIO()
  Image.fromarray(pixels, mode="RGBA").save(out, format="PNG")
  return out.getvalue()


class _Zeros(io.RawIOBase):
  """`size` bytes of 'a' read in chunks, never held whole."""

  def __init__(self, size: int):
    self.left = size

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    n = min(len(buffer), self.left)
    buffer[:n] = b"a" * n
    self.left -= n
    return n


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", **info) -> None:
  member = tarfile.TarInfo(name)
  member.size = len(data)
  for field, value in info.items():
    setattr(member, field, value)
  archive.addfile(member, io.BytesIO(data) if member.isfile() else None)


# The decodable images: key -> bytes. Their right pixels are what `transformers` makes of them (the tests).
DECODABLE = {
  "plain": lambda: jpeg(gradient()),
  "rotated": exif_rotated_jpeg,
  "cmyk": cmyk_jpeg,
  "palette_alpha": palette_png_with_alpha,
  "rgba": rgba_png,
}
# The samples a reader leaves out, by reason, and those whose image it cannot decode (in the tar they pass).
REFUSED = {"unsafe_name": 2, "link": 2, "not_a_file": 1, "too_large": 1}
UNDECODABLE = {"undecodable": 2, "too_many_pixels": 2}  # zero-byte and truncated; the two bombs


def hostile_tar(path, caption_bytes: int = CAPTION_BYTES) -> dict:
  """Writes the tar; returns {kept: [keys in archive order], refused: REFUSED, undecodable: UNDECODABLE, images:
  {key: bytes}} (kept: the samples a reader lists, the undecodable ones included)."""
  plain = jpeg(gradient())
  images = {key: make() for key, make in DECODABLE.items()}
  images["empty"], images["truncated"] = b"", plain[: len(plain) // 2]
  images["bomb_warned"] = png_bomb(10_000, 10_000)  # 100 MP: Pillow would only warn, and decode 300 MB of RGB
  images["bomb_refused"] = png_bomb(20_000, 20_000)  # 400 MP: over twice Pillow's limit
  with tarfile.open(path, "w") as archive:
    for key, data in images.items():
      _add(archive, f"{key}.jpg" if key != "bomb_warned" and key != "bomb_refused" else f"{key}.png", data)
      _add(archive, f"{key}.txt", f"a caption of {key}".encode())
      _add(archive, f"{key}.json", b'{"similarity": 0.4}')
    _add(archive, "../escape.jpg", plain)
    _add(archive, "/etc/absolute.jpg", plain)
    _add(archive, "symlink.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    _add(archive, "hardlink.jpg", type=tarfile.LNKTYPE, linkname="plain.jpg")
    _add(archive, "fifo.jpg", type=tarfile.FIFOTYPE)
    _add(archive, "long_caption.jpg", plain)
    member = tarfile.TarInfo("long_caption.txt")
    member.size = caption_bytes
    archive.addfile(member, io.BufferedReader(_Zeros(caption_bytes), 1 << 20))
  return {"kept": list(images), "refused": dict(REFUSED), "undecodable": dict(UNDECODABLE), "images": images}


def plain_tar(path) -> None:
  """The decodable samples of `hostile_tar` alone: the yardstick of a reader's time and memory."""
  with tarfile.open(path, "w") as archive:
    for key, make in DECODABLE.items():
      _add(archive, f"{key}.jpg", make())
      _add(archive, f"{key}.txt", f"a caption of {key}".encode())
