"""Streams: sequences of tasks stored as webdataset shards, with their manifests.

Import-light on purpose: Ray Data is only imported by `streams.ray_reader`.
"""
from streams.errors import ManifestError, ShardError, StreamError
from streams.manifest import ShardSet, StreamSpec, TaskSpec, expand_shards, load_stream, write_manifest

__all__ = ["ManifestError", "ShardError", "ShardSet", "StreamError", "StreamSpec", "TaskSpec", "expand_shards",
           "load_stream", "write_manifest"]
