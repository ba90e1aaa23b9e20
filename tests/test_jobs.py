"""The node's queue and on_busy policies (internvl_ros.jobs), without ROS: what is queued, refused,
preempted and cancelled, and that every job is answered once."""

from __future__ import annotations

import threading

import pytest

from internvl_ros.jobs import BusyError, CancelledError, InactiveError, JobQueue


@pytest.fixture
def jobs() -> JobQueue:
    queue = JobQueue()
    queue.activate()
    return queue


def test_an_inactive_queue_refuses_with_its_state():
    queue = JobQueue()
    queue.state = "inactive"
    refusals = queue.submit(queue.new_job("Hi?"), "queue", 4)
    assert isinstance(refusals.refused, InactiveError) and "lifecycle state inactive" in str(
        refusals.refused
    )
    assert len(queue) == 0


def test_jobs_get_increasing_ids_and_are_taken_in_order(jobs):
    submitted = [jobs.new_job(f"q{i}") for i in range(3)]
    assert [j.id for j in submitted] == [1, 2, 3]
    for job in submitted:
        assert jobs.submit(job, "queue", 4).refused is None
    assert [jobs.take().question for _ in range(1)] == ["q0"] and jobs.busy
    jobs.finish()
    assert jobs.take().question == "q1"


def test_queue_holds_at_most_queue_size_waiting(jobs):
    for i in range(2):
        assert jobs.submit(jobs.new_job(f"q{i}"), "queue", 2).refused is None
    refusals = jobs.submit(jobs.new_job("one too many"), "queue", 2)
    assert (
        isinstance(refusals.refused, BusyError)
        and str(refusals.refused) == "queue full (2 waiting): question dropped"
    )
    jobs.take()  # one leaves the queue for the worker: room for one more
    assert jobs.submit(jobs.new_job("fits"), "queue", 2).refused is None


def test_drop_refuses_while_busy_or_waiting(jobs):
    assert jobs.submit(jobs.new_job("first"), "drop", 4).refused is None
    refusals = jobs.submit(jobs.new_job("second"), "drop", 4)  # one waits: busy
    assert isinstance(refusals.refused, BusyError) and "on_busy=drop" in str(refusals.refused)
    jobs.take()
    # one runs: busy
    assert isinstance(jobs.submit(jobs.new_job("third"), "drop", 4).refused, BusyError)
    jobs.finish()
    assert jobs.submit(jobs.new_job("fourth"), "drop", 4).refused is None


def test_preempt_stops_the_running_answer_and_pushes_out_the_waiting(jobs):
    running = jobs.new_job("running")
    jobs.submit(running, "preempt", 4)
    jobs.take()
    waiting = jobs.new_job("waiting")
    jobs.submit(waiting, "queue", 4)
    newest = jobs.new_job("newest")
    refusals = jobs.submit(newest, "preempt", 4)
    assert refusals.refused is None and refusals.preempted == (waiting,)
    assert running.cancel.is_set() and running.cancel_reason == "preempted by a newer question"
    jobs.finish()
    assert jobs.take() is newest


def test_a_goal_cancelled_while_waiting_is_handed_back_and_while_running_is_stopped(jobs):
    first, second = jobs.new_job("a", goal="goal-a"), jobs.new_job("b", goal="goal-b")
    jobs.submit(first, "queue", 4)
    jobs.submit(second, "queue", 4)
    jobs.take()
    assert jobs.withdraw("goal-b") == (True, second) and len(jobs) == 0  # the caller answers it now
    assert (
        jobs.withdraw("goal-a") == (True, None) and first.cancel_reason == "cancelled by its client"
    )
    jobs.finish()
    assert jobs.withdraw("goal-a") == (False, None)  # already answered: the cancel is rejected


def test_stop_waits_for_the_running_answer_and_hands_back_the_waiting(jobs):
    running, waiting = jobs.new_job("running"), jobs.new_job("waiting")
    jobs.submit(running, "queue", 4)
    jobs.submit(waiting, "queue", 4)
    jobs.take()

    def worker_finishes_when_stopped():
        assert running.cancel.wait(5)
        jobs.finish()

    thread = threading.Thread(target=worker_finishes_when_stopped)
    thread.start()
    assert jobs.stop("the node was deactivated") == [waiting]
    thread.join(5)
    assert running.cancel_reason == "the node was deactivated" and not jobs.busy and not jobs.active
    assert isinstance(jobs.submit(jobs.new_job("late"), "queue", 4).refused, InactiveError)


def test_a_closed_queue_ends_the_worker(jobs):
    taken = []
    worker = threading.Thread(target=lambda: taken.append(jobs.take()))
    worker.start()
    jobs.stop("the node is shutting down", close=True)
    worker.join(5)
    assert taken == [None] and not worker.is_alive()


def test_cancelled_error_is_an_internvl_error():
    from internvl_engine.errors import InternVLError

    assert issubclass(CancelledError, InternVLError)
