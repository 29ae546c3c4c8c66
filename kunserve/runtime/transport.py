"""Control messages between ranks: picklable objects over a (gloo) process group.

Control traffic always uses a gloo group, also on GPUs where tensors move over NCCL, because
gloo carries CPU tensors and its point-to-point ops need no device.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist


def send_object(obj, dst: int, group) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    dist.send(torch.tensor([len(payload)], dtype=torch.int64), dst, group=group)
    dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst, group=group)


def recv_object(src: int, group):
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src, group=group)
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.recv(payload, src, group=group)
    return pickle.loads(payload.numpy().tobytes())
