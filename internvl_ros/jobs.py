"""The node's questions between their arrival and their answer: one queue, the ``on_busy`` policies,
cancelling. No ROS here, so the policies have plain unit tests (tests/test_jobs.py).

A question becomes a ``Job`` (from the question topic or an Ask goal); ``JobQueue.submit`` queues it
under the policy or says why not; the node's one worker ``take``s jobs in order and ``finish``es
them. Whatever happens, the caller answers each job exactly once: ``submit`` returns those it must
answer with an error now (the refused one, the preempted ones), ``stop`` those left waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from internvl_engine.errors import InternVLError

BUSY_POLICIES = ("queue", "drop", "preempt")


class InactiveError(InternVLError):
    """The node is not active, so it answers nothing."""


class BusyError(InternVLError):
    """The on_busy policy refused the question."""


class CancelledError(InternVLError):
    """The answer was stopped: preempted by a newer question, cancelled by its client, or the node
    stopped."""


@dataclass
class Job:
    """One question, from the topic or a goal, until its answer is out."""

    id: int
    question: str
    received: float = field(default_factory=time.monotonic)
    mode: str = ""  # empty: the mode parameter
    cameras: tuple[str, ...] = ()  # resolved camera topics (empty: all)
    choices: tuple[str, ...] = ()
    ground: str = ""  # a phrase to find: the answer is its boxes
    max_new_tokens: int = 0  # 0: the parameter
    goal: object = None  # the goal's handle, for a goal
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    result: object = None  # what its goal waits for (an rclpy Future), set by whoever answers it
    chunks: int = 0  # streamed so far
    info: dict = field(default_factory=dict)  # what /diagnostics reports about it

    def stop(self, reason: str) -> None:
        """Stop the answer between two tokens; it ends cancelled, saying ``reason``."""
        self.cancel_reason = reason
        self.cancel.set()


@dataclass(frozen=True)
class Refusals:
    """The jobs ``submit`` leaves to the caller to answer with an error now, and why."""

    refused: InternVLError | None = None  # the submitted job's, if it was not queued
    preempted: tuple[Job, ...] = ()  # waiting jobs a newer question pushed out (preempt)


class JobQueue:
    def __init__(self):
        self._jobs: deque[Job] = deque()
        self.current: Job | None = None  # the job the worker is answering
        self.active = False  # inactive: every question is refused
        self.state = "unconfigured"  # the lifecycle state, for the refusal's reason
        self._cv = threading.Condition()
        self._next_id = 1
        self._running = True

    def new_job(self, question: str, **fields) -> Job:
        with self._cv:
            job = Job(self._next_id, question, **fields)
            self._next_id += 1
        return job

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def busy(self) -> bool:
        return self.current is not None

    def submit(self, job: Job, policy: str, limit: int) -> Refusals:
        """Queue ``job`` under the ``on_busy`` policy: ``queue`` (at most ``limit`` waiting),
        ``drop`` (refused while busy) or ``preempt`` (the running answer stopped, the waiting ones
        pushed out)."""
        with self._cv:
            busy = self.current is not None or bool(self._jobs)
            if not self.active:
                return Refusals(
                    InactiveError(
                        f"the node is not active (lifecycle state {self.state}): nothing is "
                        "answered until it is activated"
                    )
                )
            if policy == "drop" and busy:
                return Refusals(BusyError("busy: question dropped (on_busy=drop)"))
            if policy == "queue" and len(self._jobs) >= limit:
                return Refusals(BusyError(f"queue full ({limit} waiting): question dropped"))
            preempted: tuple[Job, ...] = ()
            if policy == "preempt":
                preempted = tuple(self._jobs)
                self._jobs.clear()
                if self.current is not None:
                    self.current.stop("preempted by a newer question")
            self._jobs.append(job)
            self._cv.notify()
        return Refusals(preempted=preempted)

    def take(self) -> Job | None:
        """The next job, once there is one; it is the current job until ``finish``. None once
        closed."""
        with self._cv:
            while self._running and not self._jobs:
                self._cv.wait()
            if not self._running:
                return None
            self.current = self._jobs.popleft()
            return self.current

    def finish(self) -> None:
        with self._cv:
            self.current = None
            self._cv.notify_all()

    def withdraw(self, goal) -> tuple[bool, Job | None]:
        """Cancel the job of ``goal`` as its client asked: whether it was still unanswered, and the
        job if it was waiting (taken out of the queue: the caller answers it now). A job being
        answered is stopped between two tokens and ends cancelled."""
        with self._cv:
            job = next(
                (j for j in (self.current, *self._jobs) if j is not None and j.goal is goal), None
            )
            if job is None:
                return False, None
            if job is self.current:
                job.stop("cancelled by its client")
                return True, None
            self._jobs.remove(job)
            return True, job

    def stop(self, reason: str, close: bool = False) -> list[Job]:
        """Inactive from now: the running answer is stopped and waited for (the worker finishes it
        between two tokens), and the waiting jobs are returned to be answered. ``close``: the worker
        ends too."""
        with self._cv:
            self.active = False
            waiting = list(self._jobs)
            self._jobs.clear()
            if self.current is not None:
                self.current.stop(reason)
            while self.current is not None:
                self._cv.wait(0.1)
            if close:
                self._running = False
                self._cv.notify_all()
        return waiting

    def activate(self) -> None:
        with self._cv:
            self.active, self.state = True, "active"
