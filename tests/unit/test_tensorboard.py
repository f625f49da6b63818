"""The TensorBoard event files, checked against tensorboardX's own protobuf classes, CRC and record writer."""

import io
import math
import os
import struct

import numpy as np
from PIL import Image
import pytest

from visionfm_jax.training.infra import metrics, tensorboard

record_writer = pytest.importorskip("tensorboardX.record_writer")
from tensorboardX import crc32c as tbx_crc  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from tensorboardX.proto import event_pb2, summary_pb2  # noqa: E402  pylint: disable=g-import-not-at-top


def read_event_files(logdir) -> list[list]:
  """The events of each `*.tfevents.*` file in `logdir`, files in name order, each record's two CRCs checked."""
  files = []
  for name in sorted(os.listdir(logdir)):
    assert ".tfevents." in name
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    events, at = [], 0
    while at < len(data):
      header = data[at : at + 8]
      (length,) = struct.unpack("<Q", header)
      assert struct.unpack("<I", data[at + 8 : at + 12])[0] == record_writer.masked_crc32c(header)
      payload = data[at + 12 : at + 12 + length]
      assert struct.unpack("<I", data[at + 12 + length : at + 16 + length])[0] == record_writer.masked_crc32c(payload)
      events.append(event_pb2.Event.FromString(payload))
      at += 16 + length
    files.append(events)
  return files


def scalars_by_step(events) -> dict[int, dict[str, float]]:
  rows = {}
  for e in events:
    for value in e.summary.value:
      if value.WhichOneof("value") == "simple_value":
        rows.setdefault(e.step, {})[value.tag] = value.simple_value
  return rows


def images_by_step(events) -> dict[int, dict[str, np.ndarray]]:
  """{step: {tag: the decoded RGB image}} of the image summaries."""
  rows = {}
  for e in events:
    for value in e.summary.value:
      if value.WhichOneof("value") == "image":
        image = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
        assert image.shape == (value.image.height, value.image.width, value.image.colorspace)
        rows.setdefault(e.step, {})[value.tag] = image
  return rows


def _tbx_record(tmp_path, event) -> bytes:
  path = str(tmp_path / "tbx")
  writer = record_writer.RecordWriter(path)
  writer.write(event.SerializeToString())
  writer.close()
  with open(path, "rb") as f:
    return f.read()


@pytest.mark.parametrize("step", [0, 1, 127, 128, 300_000, 2**40])
def test_scalar_records_equal_tensorboardXs_byte_for_byte(tmp_path, step):
  values = {"train/loss": 6.9078, "train/lr": 0.0, "eval/val/top1": -1.5, "ünïcode/tag": math.inf}
  theirs = event_pb2.Event(
    wall_time=1732400000.123456,
    step=step,
    summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()]),
  )
  ours = tensorboard.record(tensorboard.event(1732400000.123456, step, scalars=values))
  assert ours == _tbx_record(tmp_path, theirs)


def test_file_version_and_restart_records_equal_tensorboardXs(tmp_path):
  theirs = event_pb2.Event(wall_time=12.5, file_version="brain.Event:2")
  assert tensorboard.record(tensorboard.event(12.5, file_version="brain.Event:2")) == _tbx_record(tmp_path, theirs)
  theirs = event_pb2.Event(wall_time=12.5, step=41, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
  assert tensorboard.record(tensorboard.event(12.5, 41, session_start=True)) == _tbx_record(tmp_path, theirs)


def test_image_records_equal_tensorboardXs_byte_for_byte(tmp_path):
  png = b"\x89PNG\r\n\x1a\n" + bytes(range(200))  # the bytes are carried, not decoded
  image = summary_pb2.Summary.Image(height=300, width=2000, colorspace=3, encoded_image_string=png)
  theirs = event_pb2.Event(
    wall_time=7.25, step=129, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="panel", image=image)])
  )
  ours = tensorboard.record(tensorboard.event(7.25, 129, image=("panel", 300, 2000, png)))
  assert ours == _tbx_record(tmp_path, theirs)


def test_crc32c_matches_tensorboardX_and_the_standard_check_value():
  assert tensorboard.crc32c(b"123456789") == 0xE3069283  # CRC-32C's published check value
  for data in (b"", b"a", bytes(range(256)) * 3):
    assert tensorboard.crc32c(data) == tbx_crc.crc32c(data)
    assert tensorboard.masked_crc32c(data) == record_writer.masked_crc32c(data)


def test_metric_writer_resume_and_rewind_tell_tensorboard_to_drop_later_steps(tmp_path):
  """A resumed run starts a new file whose first step event is a SessionLog START at resume_step + 1 (TensorBoard
  drops the earlier files' events of steps >= it); a rewind writes one at its step + 1."""
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 10.0 - step})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2)
  writer.write(3, {"train/loss": 3.5})
  writer.rewind(1, "a test")
  writer.write(2, {"train/loss": 2.5})
  writer.close()
  first, second = read_event_files(tmp_path / "tensorboard")
  assert first[0].file_version == "brain.Event:2" and second[0].file_version == "brain.Event:2"
  assert scalars_by_step(first) == {1: {"train/loss": 9.0}, 2: {"train/loss": 8.0}, 3: {"train/loss": 7.0}}
  kinds = [
    ("start", e.step)
    if e.session_log.status == event_pb2.SessionLog.START
    else ("scalars", e.step, e.summary.value[0].simple_value)
    for e in second[1:]
  ]
  assert kinds == [("start", 3), ("scalars", 3, 3.5), ("start", 2), ("scalars", 2, 2.5)]
