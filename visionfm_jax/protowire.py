"""Protocol Buffers' wire format, for the few messages the package writes without their generated classes (TensorBoard
events, a field JAX's compile options do not expose): https://protobuf.dev/programming-guides/encoding/."""


def varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 fields encode negatives as ten-byte two's complement
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def length_delimited(field: int, payload: bytes) -> bytes:
  return varint(field << 3 | 2) + varint(len(payload)) + payload
