"""Live sequences and where their recurrent state (h, c) lives.

- `sequence`, `manager`: the live sequences of a model version, their start, end and eviction.
- `arena`: one preallocated row per live sequence, per state tensor.
- `store`, `redis_store`, `connect`: the state stores (memory, redis), their record format and
  opening the one a URL names.
- `sync`: keeping the arena and a state store in step, one batch at a time.
"""
