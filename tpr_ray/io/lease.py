"""A lease on an output folder: one writer at a time, on local disks and object stores alike.

Two jobs writing one ``--out`` (a resubmitted RayJob while the old driver still runs, two
cross-evaluations) would delete each other's temporary files and overwrite each other's
sidecar. So a writer first takes ``<out>/_lease.json``: who holds it (a random owner id,
host, pid) and until when. The holder renews it from a background thread; a second writer
finds it held and is refused with a message naming the holder. A lease that has expired
(its holder died on another machine), or whose holder is a dead process on this machine,
can be taken over.

Taking a free lease is an exclusive create: a hard link on a local disk, a conditional PUT
(If-None-Match) on S3; of two writers racing for it, the second is refused. Where that is not
certain (S3-compatible stores may ignore the condition; other stores), and when taking over an
expired lease, the writer also waits ``settle_s`` and reads its lease back; of two writers
racing within that window the one whose lease is not read back gives way. The holder also
checks its lease before each commit (:meth:`Lease.check`), so a writer that lost it stops
before writing anything more.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from tpr_ray.io import storage
from tpr_ray.errors import ConfigError

LEASE_FILE = "_lease.json"
log = logging.getLogger(__name__)


class LeaseHeld(ConfigError):
    """The output is being written by another job."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Lease:
    """``with Lease(out): ...`` holds the lease on ``out`` for the duration of the block."""

    def __init__(self, out: str, ttl_s: float = 60.0, settle_s: float = 0.5):
        self.uri = storage.join(out, LEASE_FILE)
        self.out, self.ttl_s, self.settle_s = out, ttl_s, settle_s
        self.owner = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.lost: str | None = None
        self._expires = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking and giving back

    def acquire(self) -> "Lease":
        current = self._read()
        if current is not None and current.get("owner") != self.owner and not self._can_take_over(current):
            raise LeaseHeld(self._held_message(current))
        if current is not None and current.get("owner") != self.owner:
            log.warning("%s: taking over the lease of %s (pid %s on %s), which %s", self.out, current.get("owner"),
                        current.get("pid"), current.get("host"), self._why_free(current))
        if current is None:  # free: taking it is one atomic create where the store has one
            try:
                atomic = self._create()
            except FileExistsError:  # another writer took it since we looked
                raise LeaseHeld(self._held_message(self._read() or {})) from None
        else:
            self._write()
            atomic = False
        if not atomic:
            time.sleep(self.settle_s)
            current = self._read()
            if current is None or current.get("owner") != self.owner:
                raise LeaseHeld(self._held_message(current or {}))
        self._thread = threading.Thread(target=self._renew_loop, name="tpr-ray-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            current = self._read()
            if current is not None and current.get("owner") == self.owner:
                storage.remove(self.uri)
        except Exception as exc:  # noqa: BLE001 - the lease then simply expires
            log.warning("%s: could not give back the lease (%s); it expires by itself", self.out, exc)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raise unless this writer still holds the lease (called before every commit)."""
        if self.lost is None and time.time() > self._expires:  # renewal stalled: another may have taken over
            self.lost = "it expired before it could be renewed"
        if self.lost is not None:
            raise LeaseHeld(f"{self.out}: this job lost its lease on the output ({self.lost}); it stopped before "
                            f"writing anything more. Re-run it once the other writer is done")

    # --- the record

    def _record(self) -> dict:
        now = time.time()
        return {"owner": self.owner, "host": self.host, "pid": self.pid, "renewed": now, "expires": now + self.ttl_s}

    def _write(self) -> None:
        record = self._record()
        storage.write_json(self.uri, record)
        self._expires = record["expires"]

    def _create(self) -> bool:
        record = self._record()
        atomic = storage.create_exclusive(self.uri, storage.json_bytes(record))
        self._expires = record["expires"]
        return atomic

    def _read(self) -> dict | None:
        if not storage.exists(self.uri):
            return None
        try:
            return storage.read_json(self.uri)
        except FileNotFoundError:  # given back meanwhile
            return None

    def _can_take_over(self, lease: dict) -> bool:
        return self._why_free(lease) is not None

    def _why_free(self, lease: dict) -> str | None:
        if lease.get("expires", 0) < time.time():
            return "expired"
        if lease.get("host") == self.host and isinstance(lease.get("pid"), int) and not _process_alive(lease["pid"]):
            return "is a process of this machine that no longer runs"
        return None

    def _held_message(self, lease: dict) -> str:
        left = max(0.0, lease.get("expires", 0) - time.time())
        return (f"{self.out} is being written by another job (pid {lease.get('pid')} on {lease.get('host')}, "
                f"lease {lease.get('owner')}, renewed while it runs; it expires {left:.0f} s after that job stops). "
                f"Wait for it to finish, stop it, or choose another --out")

    # --- renewal

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                current = self._read()
                if current is None or current.get("owner") != self.owner:
                    who = f"pid {current.get('pid')} on {current.get('host')}" if current else "nobody"
                    self.lost = f"it is now held by {who}"
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - a store hiccup: retried at the next tick
                if time.time() > self._expires:
                    self.lost = f"it could not be renewed before it expired ({exc})"
                    return
                log.warning("%s: renewing the lease failed (%s); retrying", self.out, exc)
