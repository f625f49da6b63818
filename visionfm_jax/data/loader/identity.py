"""What names a run's training data, so that a resume notices data replaced under the same paths.

A source that reads stored shards answers `identity()`: its spec, record count, every shard's [name, records, bytes,
...] (`arrayrecord:` adds a digest of the shard's postscript, which moves with its total encoded bytes) and a digest
of what its dataset.json says of those shards (`records.ArrayRecordSource`, `wds.WdsSource`); any other source is
named by its repr (the embedded sets: their sizes and seeds). Shard contents are not hashed: reading 100 TB at every
start is no option, and a re-prepared shard of JPEGs changes its encoded bytes in practice; bit rot inside a shard is
caught per record by its checksums (the `arrayrecord:` reader counts such records as corrupt).
"""

from __future__ import annotations


def of_mixture(mixture) -> dict:
  """{'entries': [{'what', 'weight', **the source's identity}]} of a data/loader/mixture.py Mixture."""
  return {
    "entries": [
      {"what": entry.field, "weight": float(entry.weight), **_of_source(entry.source)} for entry in mixture.entries
    ]
  }


def _of_source(source) -> dict:
  identity = getattr(source, "identity", None)
  return identity() if callable(identity) else {"source": repr(source)}


def differences(old: dict, new: dict) -> list[str]:
  """What changed from `old` to `new`, one phrase per entry that changed; [] when nothing did."""
  old_entries, new_entries = old.get("entries", []), new.get("entries", [])
  if len(old_entries) != len(new_entries):
    return [f"{len(old_entries)} training source(s) -> {len(new_entries)}"]
  return [
    f"{n['what']}: {'; '.join(found)}"
    for o, n in zip(old_entries, new_entries)
    for found in [_entry_differences(o, n)]
    if found
  ]


def _entry_differences(old: dict, new: dict) -> list[str]:
  found = [
    f"{key} {old.get(key)!r} -> {new.get(key)!r}"
    for key in ("source", "weight", "records")
    if old.get(key) != new.get(key)
  ]
  if old.get("metadata_sha256") != new.get("metadata_sha256"):
    found.append("its dataset.json differs")
  found.extend(_shard_differences(old.get("shards") or [], new.get("shards") or []))
  return found


def _shard_differences(old: list, new: list, shown: int = 3) -> list[str]:
  before, after = {s[0]: tuple(s[1:]) for s in old}, {s[0]: tuple(s[1:]) for s in new}
  found = []
  for label, names in (("missing", sorted(set(before) - set(after))), ("new", sorted(set(after) - set(before)))):
    if names:
      found.append(f"{len(names)} shard(s) {label} ({_some(names, shown)})")
  changed = [
    f"{name} ({_size_records(before[name])} -> {_size_records(after[name])})"
    for name in sorted(set(before) & set(after))
    if before[name] != after[name]
  ]
  if changed:
    found.append(f"{len(changed)} shard(s) changed ({_some(changed, shown)})")
  return found


def _size_records(entry: tuple) -> str:
  """A shard's (records, bytes, and what else its source records of it) in words."""
  records, size, *rest = entry
  return ", ".join([f"{records:,} records", f"{size:,} bytes", *(str(x) for x in rest)])


def _some(items: list[str], shown: int) -> str:
  return ", ".join(items[:shown]) + (f", ... ({len(items)} in all)" if len(items) > shown else "")
