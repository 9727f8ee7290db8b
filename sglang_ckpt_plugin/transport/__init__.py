"""Handles (shared memory, CUDA IPC), typed wire messages, and the ZeroMQ channel."""
