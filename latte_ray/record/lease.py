"""One writer per output: the output lease.

Two drivers on one output (a double `ray job submit`, a retry submitted while the first still runs, a
backfill started by hand beside the scheduled one) would each generate every id: the whole GPU bill twice,
and two `ok` rows per id in the manifest. So every command that writes an output (run, backfill, synth,
score, compact) first takes its lease, before Ray or any model starts; read-only commands (status, report,
export, `run --dry-run`) never do.

    OUTPUT/lease/<generation>.json   {run_id, command, host, pid, started_at, heartbeat_at, heartbeat_s,
                                      expiry_s}; generation is a 12-digit counter

The lease is the object with the highest generation. A run takes it by creating generation top+1
create-only (local disk: a hard link, which fails if the name exists, storage.write_exclusive; S3: a
conditional PUT, `If-None-Match: *`), so of two runs that start together exactly one wins; the other is
refused in one line naming the holder (exit 2), or with --wait-for-lease polls until the holder ends or its
lease expires. Where the top generation is still live (its heartbeat younger than its own `expiry_s`) the
output is held; where it is stale, or its holder ran on this machine (same host, boot and PID namespace) and
its process is gone (a killed driver submitted again), its holder is taken to be dead once its object, read
again, is still there unchanged (a holder deletes it before its process ends, so one that ended cleanly just
then is not taken over): the next run creates top+1 (create-only again, so two takers cannot both win) and
marks the dead run's record `died` with its last heartbeat.

The holder renews its heartbeat every `execution.lease_heartbeat_s` from a driver thread (rewriting its own
object only; nobody else ever writes it). A holder is fenced as soon as its generation is no longer the top
one (a taker created top+1: the holder was only slow, or paused, or cut off from storage for longer than the
expiry) or its object is gone: its renewal thread marks the lease lost, the write actors check the fence
before each manifest commit (one listing of lease/) and refuse to commit, and the run ends with a one-line
reason. Like a lakehouse table's single committer with optimistic takeover: a check then a write, so a
commit already past its check when the takeover lands can still land (at worst one batch per write actor,
whose ids then have two ok rows; readers take one, storage.latest_rows).

At its end (ok, failed, interrupted, lease lost) a run deletes the lease object it created, and only that
one. A taken-over run's object stays (the next generation needs its number; a few hundred bytes), and next
to it the taker writes `<generation>.taken.json` (who took it over, when): it outlives the taker's own lease,
so a holder that was only frozen and wakes after the taker has ended still finds itself fenced.
Stores other than local disk and S3 have no create-only write latte-ray can use: a writing command refuses
to run there unless given --no-lease (the user then promises that nothing else writes the output).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import fsspec

from latte_ray.errors import LeaseLost, OutputDamaged, RunFailed  # noqa: F401 - re-exported: latte_ray.record.lease.LeaseLost
from latte_ray.record.storage import damaged, is_local, write_atomic, write_exclusive
from latte_ray.errors import InputError, LeaseHeld

log = logging.getLogger(__name__)

LEASE_DIR = "lease"
FORMAT = 1
_DIGITS = 12
WAIT_LOG_S = 60.0  # --wait-for-lease: how often it says whom it waits for


@dataclass(frozen=True)
class Terms:
    """How often the holder renews its heartbeat, and after how long without one a taker may replace it."""

    heartbeat_s: float = 30.0
    expiry_s: float = 180.0

    @classmethod
    def of(cls, execution) -> "Terms":
        """From a pipeline spec's execution section (an ExecutionSpec or its dumped dict)."""
        get = execution.get if isinstance(execution, dict) else lambda k, d=None: getattr(execution, k, d)
        return cls(float(get("lease_heartbeat_s", cls.heartbeat_s) or cls.heartbeat_s),
                   float(get("lease_expiry_s", cls.expiry_s) or cls.expiry_s))


@dataclass(frozen=True)
class Policy:
    """What a writing command does about the lease: take it (default; `take=False` is --no-lease), and when
    another run holds it, refuse (default) or wait (--wait-for-lease)."""

    take: bool = True
    wait: bool = False
    max_wait_s: float | None = None  # with wait: give up (refused, exit 2) after this long; None: no bound


def lease_dir(root: str) -> str:
    return f"{root.rstrip('/')}/{LEASE_DIR}"


def _name(generation: int) -> str:
    return f"{generation:0{_DIGITS}d}.json"


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def create_only_supported(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether storage.write_exclusive is atomic on this store (local disk, S3)."""
    return is_local(fs) or bool({"s3", "s3a"} & set(_protocols(fs)))


def _listing(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[list[int], set[int]]:
    """(the lease generations present, ascending; the generations marked taken over), from a fresh listing
    (s3fs would otherwise answer from its cache)."""
    try:
        if is_local(fs):
            names = os.listdir(folder)
        else:
            names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False, refresh=True)]
    except FileNotFoundError:
        return [], set()
    except NotADirectoryError:
        raise damaged(fs, folder, "a file where the lease folder belongs") from None
    found, taken = [], set()
    for name in names:
        stem, dot, ext = name.partition(".")
        if dot and len(stem) == _DIGITS and stem.isdigit():
            if ext == "json":
                found.append(int(stem))
            elif ext == TAKEN_SUFFIX:
                taken.add(int(stem))
    return sorted(found), taken


def generations(fs: fsspec.AbstractFileSystem, folder: str) -> list[int]:
    """The lease generations present, ascending."""
    return _listing(fs, folder)[0]


TAKEN_SUFFIX = "taken.json"  # <generation>.taken.json: written by the run that took that generation over


def read_holder(fs: fsspec.AbstractFileSystem, folder: str, generation: int) -> dict | None:
    """A lease object, None when it is gone; OutputDamaged when it is not one latte-ray wrote."""
    path = f"{folder}/{_name(generation)}"
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except (IsADirectoryError, NotADirectoryError):
        raise damaged(fs, path, "a folder where a lease object belongs") from None
    try:
        holder = json.loads(data)
        holder["heartbeat_unix"] = float(holder["heartbeat_unix"])
        holder["expiry_s"] = float(holder["expiry_s"])
    except (ValueError, KeyError, TypeError):
        raise damaged(fs, path, "not a latte-ray lease object (unreadable JSON or fields missing)") from None
    holder["generation"] = generation
    return holder


CLOCK_SKEW_S = 300.0  # a heartbeat further than this in the reader's future comes from a skewed clock
# (run id, generation, heartbeat) of a skewed heartbeat -> when this process first saw it (time.monotonic()).
_FIRST_SEEN: dict[tuple, float] = {}


def ahead_s(holder: dict, now: float | None = None) -> float:
    """How far the holder's heartbeat is in this machine's future (0 when it is not)."""
    return max(0.0, holder["heartbeat_unix"] - (time.time() if now is None else now))


def skewed(holder: dict, now: float | None = None) -> bool:
    return ahead_s(holder, now) > CLOCK_SKEW_S


def heartbeat_age(holder: dict, now: float | None = None) -> float:
    """Seconds since the holder's last heartbeat: on its own clock, or, when that clock is skewed into the
    future (the heartbeat is further ahead than CLOCK_SKEW_S), on this process's clock since it first saw
    that heartbeat, so that a skewed lease still expires once its holder stops renewing it."""
    if skewed(holder, now):
        key = (holder.get("run_id"), holder.get("generation"), holder["heartbeat_unix"])
        return time.monotonic() - _FIRST_SEEN.setdefault(key, time.monotonic())
    return max(0.0, (time.time() if now is None else now) - holder["heartbeat_unix"])


def is_live(holder: dict, now: float | None = None) -> bool:
    """Its heartbeat is younger than the expiry its holder declared, and its process is not known to be gone."""
    return heartbeat_age(holder, now) < holder["expiry_s"] and not gone_here(holder)


def _heartbeat_words(holder: dict, now: float | None = None) -> str:
    if skewed(holder, now):
        return (f"heartbeat {ahead_s(holder, now):.0f} s in this machine's future: clock skew between its host and "
                f"this one; its expiry counts from when this process first saw it, {heartbeat_age(holder, now):.0f} s "
                f"ago")
    return f"last heartbeat {heartbeat_age(holder, now):.0f} s ago"


def _machine() -> dict:
    """What tells this machine's processes apart from another's: host name, boot and PID namespace."""
    def read(path: str, link: bool = False) -> str | None:
        try:
            return os.readlink(path) if link else open(path).read().strip()
        except OSError:
            return None

    return {"host": platform.node(), "boot_id": read("/proc/sys/kernel/random/boot_id"),
            "pid_ns": read("/proc/self/ns/pid", link=True)}


# Run ids whose lease this process holds now. A lease object left by a run of this very process that has
# ended (its release failed, e.g. during a storage outage) names a pid that is alive - ours - but no live run.
_HELD_HERE: set[str] = set()


def gone_here(holder: dict) -> bool:
    """The holder ran on this machine (same host, boot and PID namespace) and its process no longer exists: a
    killed driver restarted on its host is taken over at once, not after the expiry. Anything uncertain (another
    machine, no /proc, a pid that exists, even if reused) counts as not gone, leaving it to the expiry."""
    here = _machine()
    if not here["boot_id"] or not here["pid_ns"]:
        return False
    if any(holder.get(k) != here[k] for k in ("host", "boot_id", "pid_ns")):
        return False
    try:
        if int(holder["pid"]) == os.getpid():
            return holder.get("run_id") not in _HELD_HERE
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


def top_holder(fs: fsspec.AbstractFileSystem, folder: str) -> tuple[dict | None, int]:
    """(the lease object of the highest generation, live or stale, or None; the next generation number). A
    generation marked taken over counts for the numbering even once its object is gone, so that a new lease
    never reuses a number whose mark would fence it."""
    for _ in range(10):  # its holder may delete it between the listing and the read: list again
        gens, taken = _listing(fs, folder)
        top = max([*gens, *taken], default=0)
        if top not in gens:
            return None, top + 1
        holder = read_holder(fs, folder, top)
        if holder is not None:
            holder["taken"] = top in taken
            return holder, top + 1
    return None, top + 1


def holders(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict]:
    """run id -> its lease object, for `status` (every generation present; unreadable ones left out)."""
    folder = lease_dir(root)
    found = {}
    for gen in generations(fs, folder):
        try:
            holder = read_holder(fs, folder, gen)
        except OutputDamaged:
            continue
        if holder is not None:
            found[holder.get("run_id", "?")] = holder
    return found


def describe_holder(holder: dict, url: str, now: float | None = None) -> str:
    return (f"run {holder.get('run_id', '?')} (`latte-ray {holder.get('command', '?')}` on host "
            f"{holder.get('host', '?')}, pid {holder.get('pid', '?')}; {_heartbeat_words(holder, now)}; lease "
            f"{url.rstrip('/')}/{LEASE_DIR}/"
            f"{_name(holder['generation'])})")


def _held_error(url: str, holder: dict) -> LeaseHeld:
    return LeaseHeld(
        f"output {url} is being written by {describe_holder(holder, url)}: one writer per output. Wait for it "
        f"with --wait-for-lease, or run again once it has ended; a lease whose heartbeat is older than its "
        f"expiry ({holder['expiry_s']:.0f} s) is taken over automatically"
    )


def _now_iso(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Lease:
    """A lease this run holds: renew it with `start()` (a daemon thread), ask `lost` / `check()` / `verify()`,
    hand `fence` to the write actors, and `release()` it at the end."""

    fs: fsspec.AbstractFileSystem
    url: str
    folder: str
    generation: int
    record: dict
    terms: Terms
    on_lost: Callable[[str], None] | None = None
    lost: str | None = None
    made: list[str] = field(default_factory=list)  # local folders its creation made (deepest first)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return f"{self.folder}/{_name(self.generation)}"

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def fence(self) -> dict:
        """What a write actor needs to check, before each commit, that this run still holds the lease."""
        return {"folder": self.folder, "generation": self.generation, "run_id": self.run_id, "url": self.url}

    def start(self) -> "Lease":
        self._thread = threading.Thread(target=self._keep, name="latte-ray-lease", daemon=True)
        self._thread.start()
        return self

    def _keep(self) -> None:
        last_renewed = time.monotonic()
        while not self._stop.wait(self.terms.heartbeat_s):
            try:
                reason = self.renew()
            except Exception as e:  # noqa: BLE001 - storage trouble: retried at the next beat, within the expiry
                quiet = time.monotonic() - last_renewed
                if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._lose(f"no space left on {self.url}: could not write the lease heartbeat ({e}); free space "
                               f"(or move the output), then run the same command again to resume")
                    return
                if quiet < self.terms.expiry_s:
                    log.warning("could not renew the lease on %s (%s: %s); trying again in %.1f s",
                                self.url, type(e).__name__, e, self.terms.heartbeat_s)
                    continue
                reason = (f"lease lost: could not renew the lease on {self.url} for {quiet:.0f} s (its expiry is "
                          f"{self.terms.expiry_s:.0f} s; last error {type(e).__name__}: {e}); another run may "
                          f"have taken it over, so this run commits nothing more")
            else:
                last_renewed = time.monotonic()
            if reason:
                self._lose(reason)
                return

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error(reason)
            if self.on_lost is not None:
                self.on_lost(reason)

    def _taken(self) -> str | None:
        """Why this run no longer holds the lease, or None while it does (one listing, maybe one read)."""
        return fence_breach(self.fs, self.fence)

    def renew(self) -> str | None:
        """Write a fresh heartbeat into this run's own lease object unless the lease was taken; the reason it
        was, else None."""
        if self.lost is not None:
            return self.lost
        reason = self._taken()
        if reason:
            return reason
        now = time.time()
        self.record.update(heartbeat_unix=now, heartbeat_at=_now_iso(now))
        write_atomic(self.fs, self.path, json.dumps(self.record, indent=2).encode())
        return None

    def verify(self) -> str | None:
        """Check now (not only at the next heartbeat); the reason the lease is lost, else None."""
        if self.lost is None:
            try:
                reason = self._taken()
            except Exception as e:  # noqa: BLE001 - cannot tell: the renewal thread decides within the expiry
                log.warning("could not check the lease on %s: %s: %s", self.url, type(e).__name__, e)
                reason = None
            if reason:
                self._lose(reason)
        return self.lost

    def check(self) -> None:
        """LeaseLost if the renewal thread found the lease taken."""
        if self.lost is not None:
            raise LeaseLost(self.lost)

    def release(self) -> None:
        """Stop renewing and delete this run's own lease object (only it, and only while it is this run's).
        A storage failure is logged, not raised: the lease then expires on its own."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.terms.heartbeat_s))
        try:
            current = read_holder(self.fs, self.folder, self.generation)
            if current is not None and current.get("run_id") == self.run_id:
                self.fs.rm_file(self.path)
            for folder in self.made:  # an output left as it was found: no empty lease/ (or output) folder
                try:
                    os.rmdir(folder)
                except OSError:  # not empty (another run's lease, the run's outputs): kept
                    break
        except Exception as e:  # noqa: BLE001
            log.warning("could not release the lease %s: %s: %s (it expires after %.0f s)", self.path,
                        type(e).__name__, e, self.terms.expiry_s)
        finally:
            # Only once the object is gone (or its delete failed): an object left behind is then taken over
            # at once by a later run in this process, while a taker polling meanwhile still sees it held.
            _HELD_HERE.discard(self.run_id)


def fence_breach(fs: fsspec.AbstractFileSystem, fence: dict) -> str | None:
    """Why the run of `fence` (Lease.fence) no longer holds its output's lease, or None while it does: its
    generation must be present and the highest one."""
    folder, mine, url = fence["folder"], int(fence["generation"]), fence["url"]
    gens, taken = _listing(fs, folder)
    if mine in taken:  # the taker's own lease may be gone already (it ended): its mark stays
        try:
            mark = json.loads(fs.cat_file(f"{folder}/{mine:0{_DIGITS}d}.{TAKEN_SUFFIX}"))
        except Exception:  # noqa: BLE001
            mark = {}
        return (f"lease lost: output {url} was taken over by run {mark.get('taken_by', '?')} at "
                f"{mark.get('taken_at', '?')} after this run's heartbeat went stale; this run commits nothing more")
    if mine not in gens:
        return (f"lease lost: this run's lease object {url}/{LEASE_DIR}/{_name(mine)} was deleted; this run "
                f"commits nothing more")
    if gens[-1] != mine:
        try:
            taker = read_holder(fs, folder, gens[-1])
        except OutputDamaged:
            taker = None
        who = describe_holder(taker, url) if taker else f"generation {gens[-1]}"
        return (f"lease lost: output {url} was taken over by {who} after this run's heartbeat went stale; "
                f"this run commits nothing more")
    return None


def check_fence(fs: fsspec.AbstractFileSystem, fence: dict | None) -> None:
    """Before a commit (write actors): LeaseLost if the run no longer holds the lease; nothing for a run
    without one (--no-lease)."""
    if fence is None:
        return
    from latte_ray.faults import retry

    reason = retry.call(lambda: fence_breach(fs, fence), f"check the lease under {fence['url']}", retry.READ)
    if reason:
        raise LeaseLost(reason)


def acquire(fs: fsspec.AbstractFileSystem, root: str, url: str, run_id: str, command: str, terms: Terms,
            policy: Policy = Policy(), on_takeover: Callable[[dict, "Lease"], None] | None = None,
            sleep: Callable[[float], None] = time.sleep) -> Lease | None:
    """Take the output's lease (None with `policy.take` off). Refused (LeaseHeld, one line) while another run
    holds it, unless `policy.wait`: then poll until it is released or expires. A stale holder is replaced
    and `on_takeover(holder, lease)` is called (the runner marks its record `died`)."""
    if not policy.take:
        return None
    if not create_only_supported(fs):
        protocol = _protocols(fs)[0]
        raise InputError(
            f"output {url}: {protocol}:// storage has no create-only write latte-ray can use for the output "
            f"lease (one writer per output; local disk and s3:// have one); run with --no-lease if nothing "
            f"else writes to this output"
        )
    folder = lease_dir(root)
    last_said = 0.0
    waiting_since = time.monotonic()
    while True:
        holder, generation = top_holder(fs, folder)
        now = time.time()
        if holder is not None and is_live(holder, now) and not holder["taken"]:
            if not policy.wait:
                raise _held_error(url, holder)
            waited = time.monotonic() - waiting_since
            if policy.max_wait_s is not None and waited >= policy.max_wait_s:
                raise LeaseHeld(f"gave up waiting for the lease after {waited:.0f} s (--max-lease-wait "
                                f"{policy.max_wait_s:g}): {_held_error(url, holder)}")
            if time.monotonic() - last_said >= WAIT_LOG_S:
                log.info("waiting for the lease on %s, held by %s", url, describe_holder(holder, url, now))
                last_said = time.monotonic()
            left = holder["expiry_s"] - heartbeat_age(holder, now)
            if policy.max_wait_s is not None:
                left = min(left, policy.max_wait_s - waited)
            sleep(max(0.05, min(holder.get("heartbeat_s", 1.0), left, 30.0)))
            continue
        if holder is not None and not holder["taken"]:
            # Found dead or stale: read its object again before taking it over. A holder that ended cleanly
            # deletes its object before its process ends (and before this process forgets it holds it), so
            # an object still there now was truly left behind; one gone was released after the first read
            # (a waiter would otherwise mark a cleanly ended run taken over, under the next number).
            again = read_holder(fs, folder, holder["generation"])
            if again is None or again["heartbeat_unix"] != holder["heartbeat_unix"]:
                continue
        record = {"format": FORMAT, "run_id": run_id, "command": command, **_machine(), "pid": os.getpid(), "started_at": _now_iso(now), "heartbeat_at": _now_iso(now),
                  "heartbeat_unix": now, "heartbeat_s": terms.heartbeat_s, "expiry_s": terms.expiry_s}
        made = _missing_folders(folder) if is_local(fs) else []
        _HELD_HERE.add(run_id)  # before the object exists: a taker in this process never sees it unheld
        try:
            created = write_exclusive(fs, f"{folder}/{_name(generation)}", json.dumps(record, indent=2).encode())
        except FileNotFoundError:
            created = None  # a run releasing its lease removed the empty folder meanwhile: look again
        except BaseException:
            _HELD_HERE.discard(run_id)
            raise
        if not created:
            _HELD_HERE.discard(run_id)
            continue  # another run took this generation first (it holds the lease now), or the folder went
        lease = Lease(fs=fs, url=url.rstrip("/"), folder=folder, generation=generation, record=record, terms=terms,
                      made=made)
        if holder is not None and not holder["taken"]:
            # The mark outlives the taker's own lease object (deleted when it ends), so that the old holder,
            # were it only slow, still finds that its generation was taken over (fence_breach).
            mark = {"generation": holder["generation"], "run_id": holder.get("run_id"), "taken_by": run_id,
                    "taken_at": _now_iso(now), "last_heartbeat_at": holder.get("heartbeat_at")}
            write_exclusive(fs, f"{folder}/{holder['generation']:0{_DIGITS}d}.{TAKEN_SUFFIX}",
                            json.dumps(mark, indent=2).encode())
            why = ("its process on this host is gone" if gone_here(holder) else
                   f"its heartbeat is older than its expiry ({holder['expiry_s']:.0f} s)")
            log.warning("took over the lease on %s from %s: %s", url, describe_holder(holder, url, now), why)
            if on_takeover is not None:
                on_takeover(holder, lease)
        return lease


def _missing_folders(folder: str) -> list[str]:
    """The local folders from `folder` up that do not exist yet, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


@contextmanager
def hold(fs: fsspec.AbstractFileSystem, root: str, url: str, run_id: str, command: str, terms: Terms,
         policy: Policy = Policy(), on_takeover: Callable[[dict, Lease], None] | None = None
         ) -> Iterator[Lease | None]:
    """`with hold(...) as lease:` take the lease, renew it while the block runs, release it at the end
    (whatever the end). Yields None under --no-lease."""
    lease = acquire(fs, root, url, run_id, command, terms, policy, on_takeover)
    if lease is None:
        yield None
        return
    lease.start()
    try:
        yield lease
    finally:
        lease.release()


def hold_output(out, run_id: str, command: str, terms: Terms, policy: Policy = Policy()):
    """`hold` for an output (record/output.Output): a dead holder taken over gets its run record (if it left
    one) marked `died` with its last heartbeat."""
    from latte_ray.record import output as outputs

    def died(holder: dict, lease: Lease) -> None:
        why = "its process on this host is gone" if gone_here(holder) else "its lease expired"
        if outputs.mark_died(out, holder.get("run_id", "?"), holder.get("heartbeat_at", "?"), run_id, why):
            log.warning("run %s is recorded as died (last heartbeat %s)", holder.get("run_id"),
                        holder.get("heartbeat_at"))

    return hold(out.fs, out.layout.root, out.url, run_id, command, terms, policy, on_takeover=died)


def output_terms(record: dict | None) -> Terms:
    """The lease terms for a command that has no pipeline spec of its own (score, compact): those of the spec
    the output is bound to (its latte-ray.json), else the defaults."""
    execution = ((record or {}).get("pipeline") or {}).get("execution") or {}
    return Terms.of(execution)
