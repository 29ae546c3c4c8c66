"""The cluster's process groups and control messages between ranks (picklable objects).

Control traffic always uses a gloo group, also on GPUs where tensors move over NCCL, because
gloo carries CPU tensors and its point-to-point ops need no device. Tensors use two device
groups: the default one (KV-exchange and weight-pull rounds, splits) and the activation group
(hidden states between pipeline stages), see ``init_cluster_groups``.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

# Set by ``init_cluster_groups`` on every rank at start-up (see ``activation_group``).
_activation_group = None

# Pipeline control (steps, stage timings, results) shares the cluster's gloo group with rank 0's
# commands and reports; an overlapped stage answers rank 0 before its step's result goes to the
# leader, so the two streams need their own order.
PIPELINE_TAG = 1


def init_cluster_groups(timeout=None):
    """Every rank, once, right after ``init_process_group`` (group creation is collective and
    must happen in the same order everywhere). Returns the control group (gloo: rank 0's
    commands and reports, pipeline control); also creates the activation group.

    Hidden states between pipeline stages get their own communicator, apart from the default
    group that KV-exchange and weight-pull rounds use: NCCL matches a pair's messages in the
    order they were issued, and an overlapped leader sends step k + 1's activations before it
    runs step k's round, while the member runs that round before it receives them."""
    global _activation_group
    kwargs = {} if timeout is None else {"timeout": timeout}
    control = dist.new_group(backend="gloo", **kwargs)
    _activation_group = dist.new_group(**kwargs)  # the default backend: NCCL on GPUs, gloo on CPUs
    return control


def activation_group():
    """The communicator for hidden states between pipeline stages (``init_cluster_groups``)."""
    if _activation_group is None:
        raise RuntimeError("pipelines need the activation group: call kunserve.runtime.transport."
                           "init_cluster_groups() on every rank after init_process_group")
    return _activation_group


def _framed(obj) -> tuple[torch.Tensor, torch.Tensor]:
    """(size [1] int64, payload [size] uint8): what ``recv_object`` reads, in that order."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.tensor([len(payload)], dtype=torch.int64), torch.frombuffer(bytearray(payload), dtype=torch.uint8)


def send_object(obj, dst: int, group, tag: int = 0) -> None:
    for tensor in _framed(obj):
        dist.send(tensor, dst, group=group, tag=tag)


def recv_object(src: int, group, tag: int = 0):
    """Messages between two ranks arrive in the order sent, per tag: a stream with its own tag
    (a pipeline's control, ``PIPELINE_TAG``) may run ahead of or behind the cluster's commands."""
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group, tag=tag)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group, tag=tag)
    return pickle.loads(payload.numpy().tobytes())


class PendingSends:
    """Objects sent without waiting (``isend``) and not yet delivered. An overlapped pipeline
    stage sends its step's result and moves on to the next step; the peer receives it a step
    later. Invariant: a sent buffer stays referenced here until its send completed."""

    def __init__(self):
        self._sends: list[tuple[object, torch.Tensor]] = []

    def send_object(self, obj, dst: int, group, tag: int = 0) -> None:
        for tensor in _framed(obj):
            self._sends.append((dist.isend(tensor, dst, group=group, tag=tag), tensor))

    def add(self, work, tensor: torch.Tensor) -> None:
        self._sends.append((work, tensor))

    def wait(self) -> None:
        for work, _tensor in self._sends:
            work.wait()
        self._sends.clear()
