"""One exception type per kind of data problem; each message names the file/shard/key and the fix."""


class StreamError(ValueError):
    """Base for problems with a stream's manifest or shards."""


class ManifestError(StreamError):
    """The stream manifest (YAML) is missing, malformed, or names shards that do not exist."""


class ShardError(StreamError):
    """A shard cannot be read (corrupt, truncated, missing) or holds a bad sample."""


class SourceError(StreamError):
    """The input to a stream converter (image folder, table, existing shards) has a problem."""


class MissingSourceError(SourceError):
    """A packaged data source a stream recipe reads (Debian or npm package, rsvg-convert) is not installed."""


class MissingDatasetError(SourceError):
    """A dataset a protocol builder reads (MTIL's torchvision datasets) is not on disk in the layout it expects."""
