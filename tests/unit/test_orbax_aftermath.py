"""After an Orbax read fails, its sibling reads end as asyncio tasks nobody awaits: their tracebacks are dropped, as
the error line already named the fault, and every other unawaited task's error is still logged."""

import asyncio
import gc
import logging

from visionfm_jax import cli


def _leave_a_failed_task(error: Exception) -> None:
  async def read():
    raise error

  async def body():
    asyncio.ensure_future(read())
    await asyncio.sleep(0.01)  # the task ends with its exception; nothing awaits it

  loop = asyncio.new_event_loop()
  loop.run_until_complete(body())
  loop.close()
  # the task's exception is logged when the task is collected: young objects, a collection of the two young
  # generations (a full one scans a test worker's whole heap: 6 s late in the suite)
  gc.collect(1)


def test_an_unawaited_tensorstore_read_error_is_dropped_and_any_other_is_logged(caplog):
  cli.ignore_closed_event_loops()
  cli.ignore_closed_event_loops()  # installs once
  with caplog.at_level(logging.ERROR, logger="asyncio"):
    _leave_a_failed_task(
      ValueError(
        'FAILED_PRECONDITION: Error reading "params.pos_embed/0.0.0" in OCDBT database '
        'at local file "/run/checkpoints/2/state/": Truncated Zstd-compressed stream'
      )
    )
    assert not [r for r in caplog.records if r.name == "asyncio"]
    _leave_a_failed_task(ValueError("some other fault"))
  logged = [r for r in caplog.records if r.name == "asyncio"]
  assert len(logged) == 1 and "Task exception was never retrieved" in logged[0].getMessage()
  assert str(logged[0].exc_info[1]) == "some other fault"
  assert len(logging.getLogger("asyncio").filters) == 1
