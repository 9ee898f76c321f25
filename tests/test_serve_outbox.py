"""The worker's events reach the event loop once per turn (pocketlm.serve.app.Outbox): in order, and the worker
goes on only once the streams they woke have taken their turn."""

import asyncio
import threading

from pocketlm.serve.app import Outbox
from pocketlm.serve.scheduler import Job


def test_a_turns_events_arrive_in_order_before_the_worker_goes_on():
    outbox, seen, after_hand_over = Outbox(), [], []

    async def main():
        outbox.loop = asyncio.get_running_loop()
        queues = [asyncio.Queue(), asyncio.Queue()]

        async def stream(i):  # a response's stream: takes each event as it comes
            for _ in range(3):
                seen.append((i, await queues[i].get()))

        def worker():  # one turn of the scheduler's loop: events for both streams, then the hand-over
            job = Job(request=None, emit=print)
            for token in range(3):
                for i in (0, 1):
                    outbox.put(job, queues[i], token)
            outbox.hand_over()
            after_hand_over.extend(seen)  # what the streams had taken when the worker went on

        streams = [asyncio.create_task(stream(i)) for i in (0, 1)]
        await asyncio.sleep(0)  # both streams now wait for their first event
        await asyncio.to_thread(worker)
        await asyncio.gather(*streams)

    asyncio.run(main())
    assert [token for i, token in seen if i == 0] == [0, 1, 2] == [token for i, token in seen if i == 1]
    assert sorted(after_hand_over) == sorted(seen)  # all six taken before hand_over returned
    assert not outbox.pending


def test_events_after_the_loop_closed_cancel_their_jobs():
    outbox, loop = Outbox(), asyncio.new_event_loop()
    outbox.loop = loop
    loop.close()
    job = Job(request=None, emit=print)
    outbox.put(job, None, "event")
    outbox.hand_over()  # no error: the server is shutting down
    assert job.cancelled.is_set() and not outbox.pending


def test_nothing_to_hand_over_returns_at_once():
    outbox = Outbox()  # no loop yet: no request has come
    done = threading.Event()
    threading.Thread(target=lambda: (outbox.hand_over(), done.set())).start()
    assert done.wait(5)
