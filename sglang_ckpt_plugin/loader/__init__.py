"""Loader side: read the checkpoint, plan shards and buckets, push them, the CLI."""
