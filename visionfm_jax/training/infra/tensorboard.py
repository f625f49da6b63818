"""TensorBoard event files of scalars, written from the format's spec with no TensorFlow, tensorboardX or protobuf.

A file is a sequence of TFRecords (length, masked CRC-32C of the length, payload, masked CRC-32C of the payload),
each payload one serialised `tensorflow.Event`. Only the fields the metric writer needs are encoded: wall_time (1),
step (2), file_version (3), summary (5) of `Value{tag (1), simple_value (2) | image (4)}` (an image: `{height (1),
width (2), colorspace (3), encoded_image_string (4)}`), session_log (7) of `{status (1)}`.
(tensorboardX imports torch when it finds it, seconds of start-up for every training process of a test suite.)"""

from __future__ import annotations

import os
import socket
import struct
import time

from visionfm_jax.protowire import length_delimited as _length_delimited
from visionfm_jax.protowire import varint as _varint

_SESSION_START = 1  # tensorflow.SessionLog.START: TensorBoard drops the events of steps >= this event's step


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli's polynomial, reflected
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(payload: bytes) -> bytes:
  """One TFRecord."""
  length = struct.pack("<Q", len(payload))
  return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def event(
  wall_time: float,
  step: int = 0,
  *,
  file_version: str | None = None,
  scalars: dict[str, float] | None = None,
  image: tuple[str, int, int, bytes] | None = None,
  session_start: bool = False,
) -> bytes:
  """A serialised `tensorflow.Event` (fields in number order, as protobuf writes them); `image`: (tag, height,
  width, PNG bytes) of one RGB image."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
  if step:
    out += _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalars:
    values = b"".join(
      _length_delimited(1, _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
      for tag, value in scalars.items()
    )
    out += _length_delimited(5, values)
  if image is not None:
    tag, height, width, png = image
    encoded = (
      _varint(1 << 3)
      + _varint(height)
      + _varint(2 << 3)
      + _varint(width)
      + _varint(3 << 3)
      + _varint(3)
      + _length_delimited(4, png)
    )
    image_value = _length_delimited(1, tag.encode()) + _length_delimited(4, encoded)
    out += _length_delimited(5, _length_delimited(1, image_value))
  if session_start:
    out += _length_delimited(7, _varint(1 << 3) + _varint(_SESSION_START))
  return out


class EventFile:
  """Appends scalar events to a new `events.out.tfevents.*` file in `logdir`.

  A run that resumes at step s (or rewinds to it) calls `restart(s + 1)`: TensorBoard then drops the events of
  steps > s that earlier files hold, as it does for TensorFlow's own restarts."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{time.monotonic_ns():020d}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._write(event(now, file_version="brain.Event:2"))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(event(time.time(), step, scalars=values))

  def image(self, step: int, tag: str, height: int, width: int, png: bytes) -> None:
    self._write(event(time.time(), step, image=(tag, height, width, png)))

  def restart(self, step: int) -> None:
    self._write(event(time.time(), step, session_start=True))

  def _write(self, payload: bytes) -> None:
    self._file.write(record(payload))
    self._file.flush()

  def close(self) -> None:
    self._file.close()
