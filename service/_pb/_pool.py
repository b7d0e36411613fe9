"""The descriptor pool the generated modules register in (not protobuf's default)."""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
