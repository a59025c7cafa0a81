"""The "cuda_ipc" K/V transport: a prefill's K/V handed to a decode instance of the same node
through device memory, never through the host (PD disaggregation, docs/flowserve.md).

    prefill instance                                           decode instance
    the engine leaves the gathered K/V on the device;
    KVStore holds them (TTL, byte caps)  ── KVHandle(cuda_ipc, location=<url>/kv/{id}) ──▶
                                         ◀── POST <location>/share {"peer": SharePeer} ──
    its platform makes one handle for that peer
                                         ── {"tensor": handle, "first_token_id", ...} ──▶
                                                          its platform copies the K/V
                                                          (device to device), closes the handle
                                         ◀── DELETE <location> ─────────────────────────
    the buffer is freed

The control plane asks for "shm" (or "cuda_ipc") when both instances are on one node; a prefill
instance whose platform shares device memory (`Platform.device_share()`: CUDA) answers with a
cuda_ipc handle, any other writes the shm file as before. The device parts (making and opening
handles) are the platform's (`dataplane.flowserve.device_share`); this module is the protocol.

A transfer is shared at most once, and only with a peer that can open it (one of its GPUs, the
same torch): a handle nobody opens would keep its memory allocated. A decode instance whose
platform shares no device memory (the host) or that cannot map the prefill's GPU gets no handle,
and its fetch fails (the instance answers 409 kv_transfer_failed; the control plane recomputes
the prompt there). Whatever happens, the decode instance deletes the transfer when it is done.

On the decode side the copies wait on the device until the engine writes them into KV blocks;
`SharedImports` caps the bytes they hold there (`KVTransferConfig.max_device_bytes`) and takes
K/V past the cap into pinned host memory instead.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import torch
from starlette.concurrency import run_in_threadpool

from controlplane.wire import KVHandle
from dataplane.flowserve.device_share import DeviceShare, DeviceShareError, SharePeer
from dataplane.flowserve.prompt_kv import PromptKV

DROP_TIMEOUT_S = 5.0


# --- the prefill side ------------------------------------------------------------------------


def share_answer(kv: PromptKV, body: Any, share: DeviceShare) -> dict[str, Any]:
    """The answer to `POST /kv/{id}/share`: a handle of `kv`'s device buffer for the peer that
    `body` names, and what the handle does not carry. Raises DeviceShareError when that peer
    cannot open it."""
    peer = SharePeer.from_json(body.get("peer") if isinstance(body, dict) else None)
    return {
        "tensor": share.share(kv.kv, peer),
        "first_token_id": kv.first_token_id,
        "prompt_digest": kv.prompt_digest,
    }


# --- the decode side -------------------------------------------------------------------------


class SharedImports:
    """A decode instance's side of cuda_ipc: what its platform can open, and the device bytes
    its imported K/V hold until the engine has written them (a thread-safe count)."""

    def __init__(self, share: DeviceShare, max_device_bytes: int) -> None:
        self.share = share
        self.max_device_bytes = max_device_bytes
        self._held = 0
        self._lock = threading.Lock()

    def peer(self) -> SharePeer:
        """What this instance can open (its platform asks the device on the first import)."""
        try:
            return self.share.peer()
        except RuntimeError as exc:
            raise DeviceShareError(f"cannot tell which GPUs this instance can map: {exc}") from exc

    @property
    def device_bytes(self) -> int:
        with self._lock:
            return self._held

    def take(self, shared: Any, num_bytes: int) -> torch.Tensor:
        """A copy of the `num_bytes` of K/V `shared` names: on the device while the cap allows,
        else in pinned host memory. Raises DeviceShareError."""
        if not isinstance(shared, Mapping):
            raise DeviceShareError("the share answer holds no tensor handle")
        with self._lock:
            on_device = self._held + num_bytes <= self.max_device_bytes
            if on_device:
                self._held += num_bytes
        try:
            tensor = self.share.take(shared, num_bytes=num_bytes, to_host=not on_device)
        except BaseException as exc:
            if on_device:
                self._release(num_bytes)
            if isinstance(exc, RuntimeError):  # the device's own error, not a refusal
                raise DeviceShareError(f"cannot take the shared K/V: {exc}") from exc
            raise
        if on_device:  # counted until the engine has written and dropped them
            weakref.finalize(tensor, self._release, num_bytes)
        return tensor

    def _release(self, num_bytes: int) -> None:
        with self._lock:
            self._held -= num_bytes


async def fetch_shared(
    handle: KVHandle, client: httpx.AsyncClient, imports: SharedImports | None
) -> PromptKV:
    """Copy the K/V of a cuda_ipc `handle` (its location checked by the caller) and delete the
    transfer on the prefill instance, whether or not the copy worked. Raises DeviceShareError."""
    try:
        if imports is None:
            raise DeviceShareError(
                "the K/V wait in the prefill instance's GPU memory, and this instance's platform "
                "cannot map another process's device memory"
            )
        answer = await _ask_share(handle, client, imports.peer())
        tensor = await run_in_threadpool(imports.take, answer["tensor"], handle.num_bytes)
        try:
            return PromptKV(tensor, answer["first_token_id"], answer["prompt_digest"])
        except ValueError as exc:
            raise DeviceShareError(f"the shared K/V are unusable: {exc}") from exc
    finally:
        with anyio.CancelScope(shield=True):  # a fetch past its deadline still frees them
            await drop(handle, client)


async def drop(handle: KVHandle, client: httpx.AsyncClient) -> None:
    """Best effort: the prefill instance's TTL is the backstop."""
    try:
        await client.delete(handle.location, timeout=DROP_TIMEOUT_S)
    except httpx.HTTPError:
        pass


async def _ask_share(handle: KVHandle, client: httpx.AsyncClient, peer: SharePeer) -> Any:
    url = f"{handle.location}/share"
    try:
        response = await client.post(url, json={"peer": peer.to_json()})
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise DeviceShareError(f"cannot have {url}: {exc}") from exc
    if response.status_code != 200:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        raise DeviceShareError(f"{url} answered {response.status_code}: {message or body}")
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("first_token_id"), int)
        or not isinstance(body.get("prompt_digest"), str | None)
    ):
        raise DeviceShareError(f"{url} answered no share of K/V")
    return body
