"""PeerWatch's judgement of its peers (training/infra/faults.py), driven beat by beat on a scripted clock: no
service, no process, no sleeping. The end-to-end cases (a killed, a stopped, a frozen coordinator) are the
multi-process tests'."""

import re

import pytest

from visionfm_jax.training.infra import faults

TIMEOUT_S, INTERVAL_S = 5.0, 0.5


class _Clock:
  """time.monotonic, moved on only by the watch's waits: each wait one beat, or the stop's length where one is
  scripted."""

  def __init__(self, stops: dict[int, float], set_stops: dict[int, float] | None = None):
    self.now, self.waits, self.stops, self.set_stops = 100.0, 0, stops, set_stops or {}

  def monotonic(self) -> float:
    return self.now


class _Stop:
  """The watch's stop event: each wait advances the clock; set after `beats` waits or by an abort."""

  def __init__(self, clock: _Clock, beats: int):
    self.clock, self.beats, self.set_ = clock, beats, False

  def wait(self, _interval) -> bool:
    self.clock.waits += 1
    self.clock.now += self.clock.stops.get(self.clock.waits, INTERVAL_S)
    self.set_ = self.set_ or self.clock.waits > self.beats
    return self.set_

  def is_set(self) -> bool:
    return self.set_


class _Store:
  """The service's key-value store as process 0 reads it: the peer's beat at each read, from `beats(now)`."""

  def __init__(self, clock: _Clock, beats):
    self.clock, self.beats = clock, beats

  def key_value_set(self, key, value, allow_overwrite):
    del key, value, allow_overwrite
    self.clock.now += self.clock.set_stops.get(self.clock.waits, 0.0)

  def key_value_try_get(self, key):
    assert key == f"{faults.PeerWatch.PREFIX}1"
    return self.beats(self.clock.now)


def _watch(monkeypatch, peer_beats, stops, beats=30, set_stops=None) -> list[str]:
  """The lines process 0 of 2 would exit with, watching a peer whose beat at time t is `peer_beats(t)`; `stops`
  stop the process in a wait, `set_stops` in the heartbeat's write after that wait."""
  clock = _Clock(stops, set_stops)
  monkeypatch.setattr(faults.time, "monotonic", clock.monotonic)
  watch = object.__new__(faults.PeerWatch)
  watch.timeout_s, watch._interval, watch._me, watch._count, watch._service = TIMEOUT_S, INTERVAL_S, 0, 2, ""
  watch._client, watch._stop = _Store(clock, peer_beats), _Stop(clock, beats)
  watch._last_seen, watch._answered = {1: (None, clock.now)}, clock.now
  lines = []

  def abort(what):
    lines.append(what)
    watch._stop.set_ = True

  monkeypatch.setattr(watch, "_abort", abort)
  watch._watch()
  return lines


def _frozen_at(t_freeze):
  """A peer that beat until process 0 was stopped at `t_freeze` and never again (the store froze with process 0,
  and the peer gave up and exited meanwhile)."""
  return lambda now: f"{int(min(now, t_freeze) * 2)} vm 4242"


def test_a_peer_gone_while_this_process_was_stopped_is_named_after_the_thaw_grace(monkeypatch):
  # stopped for 6 s (longer than the peer timeout) at the third wait
  lines = _watch(monkeypatch, _frozen_at(101.0), stops={3: 6.0})
  assert len(lines) == 1, lines
  assert lines[0].startswith(
    "process 1 of 2 (last seen: host vm, pid 4242) has sent no heartbeat in the 2s since "
    "this process resumed after being stopped for 6s"
  ), lines


def test_a_stop_during_the_heartbeats_write_is_a_stop_too(monkeypatch):
  # stopped for 6 s inside the third beat's write to the store, not in a wait
  lines = _watch(monkeypatch, _frozen_at(101.0), stops={}, set_stops={3: 6.0})
  assert len(lines) == 1, lines
  assert "since this process resumed after being stopped for 6s" in lines[0], lines


def test_a_peer_that_beats_again_after_the_thaw_is_not_blamed(monkeypatch):
  assert _watch(monkeypatch, lambda now: f"{int(now * 2)} vm 4242", stops={3: 6.0}) == []


@pytest.mark.parametrize("silent_after", [101.0, 104.0])
def test_a_peer_silent_for_the_timeout_is_named_without_a_stop(monkeypatch, silent_after):
  lines = _watch(monkeypatch, _frozen_at(silent_after), stops={})
  assert len(lines) == 1 and re.match(
    r"process 1 of 2 \(last seen: host vm, pid 4242\) has sent no heartbeat for "
    r"[56]s \(config.peer_timeout_s=5\): it died",
    lines[0],
  ), lines
