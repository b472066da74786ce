"""What the console shows of Ray's processes: raylt's own lines only, unless `-v`.

Ray forwards every line its worker processes write (`log_to_driver`) to the driver's console:
its own actors' notices (Ray Train's placement-group cleaner warns every second when the State
API, served by the dashboard, is not running), C++ core-worker messages, library deprecation
warnings, and each line a Ray Train worker prints twice (its stdout and stderr both carry it).
Lines raylt means for the console are printed in workers with `worker_line`, which marks them;
at default verbosity the driver prints those lines, once each, without Ray's prefix, and
drops the rest (they stay in Ray's session logs, /tmp/ray/session_latest/logs). `-v` keeps
Ray's own printing.

Starting the dashboard instead, so that the cleaner's queries succeed, cost 2 s of start-up
and 1.1 GB of memory in 10 more processes on 2 cores; quieting one logger in the workers would
leave the C++ and deprecation lines.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time

MARK = "[raylt] "
_state = {"verbose": False}
_lock = threading.Lock()
# (pid, actor or task) -> {line: times printed}, and (that key, stream) -> {line: times seen}: a
# line is printed when one stream has carried it more often than it was printed, so the second
# stream's copy of a line is dropped however the two streams' batches interleave, and a line a
# worker really prints twice is printed twice.
_printed: dict = {}
_seen: dict = {}


# A Ray Train worker's epoch line (raylt.head.fit_ray): on a terminal, the driver draws it as a bar.
EPOCH = re.compile(r"^epoch (\d+)/(\d+): (.*)$")
_bars: dict = {}  # (pid, actor or task) -> the tqdm bar of that worker's epochs


def set_verbose(verbose: bool) -> None:
    _state["verbose"] = verbose


def live() -> bool:
    """Whether progress is drawn as live bars: raylt's INFO lines go to a terminal. Elsewhere
    (CI, `ray job submit` logs, a file) progress is a line at most every few seconds."""
    return sys.stderr.isatty() and logging.getLogger("raylt").isEnabledFor(logging.INFO)


def worker_line(message: str) -> None:
    """A line for the user's console from inside a Ray worker; shown at once when the caller
    is the driver itself (Ray Train's local mode runs a worker's loop there)."""
    if _in_driver():
        _show((os.getpid(), None), message)
    else:
        print(MARK + message, flush=True)


def _in_driver() -> bool:
    worker = sys.modules.get("ray._private.worker")
    return worker is None or worker.global_worker.mode != worker.WORKER_MODE


def _own_lines(data: dict) -> None:
    key = (data.get("pid"), data.get("actor_name") or data.get("task_name"))
    with _lock:
        printed = _printed.setdefault(key, {})
        seen = _seen.setdefault((key, bool(data.get("is_err"))), {})
        for line in data.get("lines", ()):
            if not line.startswith(MARK):
                continue
            text = line[len(MARK):]
            seen[text] = seen.get(text, 0) + 1
            if seen[text] <= printed.get(text, 0):
                continue
            printed[text] = seen[text]
            _show(key, text)


def _show(key, text: str) -> None:
    epoch = EPOCH.match(text) if live() else None
    if epoch is None:
        print(text, file=sys.stdout, flush=True)
        return
    from tqdm import tqdm

    done, total = int(epoch[1]), int(epoch[2])
    bar = _bars.get(key)
    if bar is None or bar.total != total:
        # started at the first line's epoch: the rate is of the epochs seen arriving
        bar = _bars[key] = tqdm(total=total, initial=done, desc="epochs", unit=" epochs", dynamic_ncols=True,
                                leave=True)
    bar.update(done - bar.n)
    bar.set_postfix_str(epoch[3])
    if done >= total:
        bar.close()
        del _bars[key]


def ray_logging_level() -> int:
    """`ray.init(logging_level=...)`: Ray's start-up notice is Ray's, not raylt's (`ray.init`
    sets its logger's level itself, so the CLI's levels cannot reach it)."""
    return logging.INFO if _state["verbose"] else logging.WARNING


def route_worker_logs() -> None:
    """After `ray.init(log_to_driver=True)`: at default verbosity, only raylt's own worker
    lines reach the console. Ray's dispatcher is internal: if it moves, Ray's printing stays."""
    if _state["verbose"]:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover - a Ray without it prints as it always did
        logging.getLogger(__name__).debug("Ray's log dispatcher is not where it was; Ray's worker lines stay")
        return
    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", _own_lines)  # ray.shutdown removes it by this name


def rate_text(per_s: float) -> str:
    """A rate as people read it: 1234, 12.3, 0.25 (5 rows in 20 s are not "0 rows/s")."""
    return f"{per_s:.0f}" if per_s >= 100 else f"{per_s:.3g}"


class Progress:
    """A long stage's progress on the driver: a live bar (tqdm) with rate and ETA on a terminal;
    elsewhere (CI, `ray job submit` logs, a file) a log line at most every `every` seconds and
    at the end, so a log stays short."""

    def __init__(self, what: str, total: int | None, unit: str, log: logging.Logger, every: float = 5.0):
        self.what, self.total, self.unit, self.log, self.every = what, total, unit, log, every
        self.t0 = self.shown = time.perf_counter()
        self.done = 0
        self.bar = None
        if live():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", dynamic_ncols=True, leave=True)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, done: int, note: str = "", line: str | None = None) -> None:
        """`done` of `total` (None: unknown) so far; `note` joins the bar and the line (e.g. "3/14
        shards"); `line` replaces the logged line off a terminal."""
        step, self.done = done - self.done, done
        if self.bar is not None:
            self.bar.update(step)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        now = time.perf_counter()
        if (self.total is not None and done >= self.total) or now - self.shown >= self.every:
            self.shown = now
            if line is None:
                of = f"/{self.total}" if self.total is not None else ""
                extra = f", {note}" if note else ""
                line = f"{self.what}: {done}{of} {self.unit}, {rate_text(self.rate())} {self.unit}/s{extra}"
            self.log.info("%s", line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
