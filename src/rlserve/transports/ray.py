"""RayTransport: actors are Ray actors or tasks; one Ray call per request.

Two ways to host the server (see docs/ray.md for why):

* **in a Ray actor** -- ``RayTransport(policy_factory=make_policy, server_kwargs=...)``
  starts a threaded Ray actor that builds the policy with the factory and runs
  an :class:`~rlserve.InferenceServer` on an in-actor queue. A request is one
  actor call: its request thread enqueues it and blocks for its row; the
  server batches whatever calls are pending.
* **in the driver** -- ``InferenceServer(policy, RayTransport())`` as with any
  transport. Ray cannot deliver actor calls to the driver, so a small async
  *gateway* actor holds the pending calls and the driver long-polls it: one
  ``take`` call brings every pending request, one ``answer`` call returns a
  whole batch. A client still makes one Ray call per request.

Clients (:class:`RayClient`) are small picklable objects holding the actor
handle; pass them to Ray tasks and actors. This module is the driver and
caller side (transport, client); the bodies of the two actors are in
:mod:`rlserve.transports._ray_server`.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Sequence

from .._td import TensorDictBase

from ..errors import AnswerTimeout, ServerClosedError, ServerDeadError
from ..interaction import with_caller_mode
from ..transport import InferenceClient, InferenceTransport, TransportCapabilities
from ._ray_server import _EXITED_ON_PURPOSE, _HEARTBEAT_S, _GatewayImpl, _server_actor_class
from ._remote import HostedServerMixin, decode_td, encode_replies, encode_td, reply_error, reply_of, unwrap_reply

__all__ = ["RayTransport", "RayClient"]

_perf = time.perf_counter


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("RayTransport needs Ray: pip install 'rlserve[ray]'") from None
    return ray


def _dead_error(e: BaseException, what: str) -> ServerDeadError:
    err = ServerDeadError(f"the Ray {what} actor serving this client is gone ({type(e).__name__}: {e})")
    err.__cause__ = e
    return err


# -- the client ------------------------------------------------------------------
class RayClient(InferenceClient):
    """Actor-side client: ``client(td)`` blocks, ``client.submit(td)`` returns a Future.

    Picklable: it holds only the server (or gateway) actor handle.
    """

    def __init__(self, handle, what: str = "server"):
        super().__init__(None)  # no transport object here: the actor handle is the way in
        self._handle = handle
        self._what = what

    def __reduce__(self):
        return (RayClient, (self._handle, self._what))

    def submit(self, td: TensorDictBase) -> Future:
        ref = self._handle.infer.remote(encode_td(with_caller_mode(td)))
        out: Future = Future()
        what = self._what

        def done(f):
            if out.cancelled():
                return
            try:
                out.set_result(unwrap_reply(f.result()))
            except BaseException as e:
                out.set_exception(_translate(e, what))

        ref.future().add_done_callback(done)
        return out

    def __call__(self, td, timeout: float | None = None):
        ray = _ray()
        ref = self._handle.infer.remote(encode_td(with_caller_mode(td)))
        try:
            reply = ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise AnswerTimeout(f"no answer from the inference server within {timeout} s") from None
        except BaseException as e:
            raise _translate(e, self._what) from None
        return unwrap_reply(reply)


def _translate(e: BaseException, what: str) -> BaseException:
    import ray

    if isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
        if _EXITED_ON_PURPOSE in str(e):  # RayTransport.shutdown() ended it (see _exit_actor)
            err = ServerClosedError(f"the inference server was shut down (its Ray {what} actor has exited)")
            err.__cause__ = e
            return err
        return _dead_error(e, what)
    return e


# -- the transport ----------------------------------------------------------------------
class RayTransport(HostedServerMixin, InferenceTransport):
    """Serve Ray actors and tasks; the server runs in the driver or in a Ray actor.

    Args:
        policy_factory: when given, the server runs inside a new threaded Ray
            actor: ``policy_factory()`` builds the policy there and an
            :class:`~rlserve.InferenceServer` serves it. Without it, use the
            transport with an ``InferenceServer`` in the driver as usual.
        server_kwargs: keyword arguments of that ``InferenceServer``
            (``max_batch_size``, ``timeout``, ``weight_sync``...).
        actor_options: ``.options(...)`` of the server (or gateway) actor,
            e.g. ``{"num_cpus": 1}`` or a scheduling strategy. Default
            ``num_cpus=0``: the actor does not hold a CPU slot.
        startup_timeout: seconds to wait for the server actor to be built.
        dead_after: driver-hosted mode only: clients get ServerDeadError when
            the driver's server sends no heartbeat for this many seconds.
        max_callers: actor-hosted mode only: request threads of the server
            actor, i.e. how many calls it holds at once (more wait in Ray's
            queue); keep it at or above ``max_batch_size``.
        max_queue_size: torchrl's bound on pending requests: with the server
            in an actor, its request threads (``max_callers``); with the server
            in the driver, more pending requests than this are refused with
            :class:`~rlserve.QueueFullError`. ``None``: no bound of its own.

    Needs Ray (``pip install 'rlserve[ray]'``); ``ray.init()`` is called on
    first use if the caller has not done it.
    """

    capabilities = TransportCapabilities(whole_batches=True, timed_drain=True, wakeable=True)
    _engine = "Ray"

    def __init__(
        self,
        policy_factory=None,
        *,
        server_kwargs: dict | None = None,
        actor_options: dict | None = None,
        startup_timeout: float = 120.0,
        dead_after: float = 3.0,
        max_callers: int = 256,
        max_queue_size: int | None = None,
    ):
        ray = _ray()
        if max_queue_size is not None:
            if max_queue_size < 1:
                raise ValueError(f"max_queue_size must be >= 1 or None, got {max_queue_size}")
            max_callers = max_queue_size
        self.max_queue_size = max_queue_size
        opts = {"num_cpus": 0}
        opts.update(actor_options or {})
        self._hosted = policy_factory is not None
        self._buf: deque = deque()
        self._poll = None
        self._closed_flag = True
        self._hb_thread = None
        self._hb_stop = threading.Event()
        self._signal = threading.Lock()  # released when a long-poll lands
        self._signal.acquire()
        if self._hosted:
            opts.setdefault("max_concurrency", max_callers)  # request threads: calls served at once
            cls = _server_actor_class(ray, opts.pop("concurrency_groups", None) or {})
            self._handle = cls.options(**opts).remote(policy_factory, dict(server_kwargs or {}))
            ray.get(self._handle.ready.remote(), timeout=startup_timeout)  # surfaces factory errors
        else:
            if server_kwargs:
                raise ValueError("server_kwargs only apply with policy_factory (server in a Ray actor)")
            opts.setdefault("max_concurrency", 10_000)  # async actor: pending calls are cheap coroutines
            cls = ray.remote(_GatewayImpl)
            self._handle = cls.options(**opts).remote(dead_after, max_queue_size)
            ray.get(self._handle.ready.remote(), timeout=startup_timeout)  # requests queue there until start()

    # -- both modes ---------------------------------------------------------------------
    @property
    def actor(self) -> Any:
        """The Ray actor handle clients call (server actor, or gateway in driver mode)."""
        return self._handle

    def client(self) -> RayClient:
        if self._handle is None:
            raise ServerClosedError("this RayTransport is shut down")
        return RayClient(self._handle, "server" if self._hosted else "gateway")

    # -- server-in-an-actor mode -------------------------------------------------------
    def stats(self, timeout: float = 30.0) -> dict:
        """The actor-hosted server's stats (actor-hosted mode)."""
        self._need_hosted("stats")
        return _ray().get(self._handle.stats.remote(), timeout=timeout)

    def update_weights(self, weights: Any, version: int | None = None, timeout: float = 60.0, *,
                       mark_weight_update: bool = True) -> int:
        """Hand weights to the actor-hosted server; applied between batches (see
        :meth:`InferenceServer.update_weights <rlserve.InferenceServer.update_weights>`)."""
        self._need_hosted("update_weights")
        return _ray().get(self._handle.update_weights.remote([weights], version, mark_weight_update),
                          timeout=timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the actor-hosted server (pending requests get ServerClosedError) and end its actor."""
        ray = _ray()
        if self._handle is None:
            return
        if self._hosted:
            try:
                ray.get(self._handle.shutdown.remote(), timeout=timeout)
            except Exception:  # already dead or stuck: the kill below settles it
                pass
        self._stop_heartbeat()
        # The actor ends itself, so clients still holding its handle get ServerClosedError
        # (Ray records the exit as intended); ray.kill only when that does not work.
        try:
            ray.get(self._handle.exit.remote(), timeout=timeout)
            exited = False
        except ray.exceptions.RayActorError as e:
            exited = _EXITED_ON_PURPOSE in str(e)
        except Exception:
            exited = False
        if not exited:
            ray.kill(self._handle)
        self._handle = None

    # -- driver-hosted mode: the InferenceTransport side ----------------------------------
    def open(self) -> None:
        _ray().get(self._handle.set_state.remote("serving"), timeout=30)
        self._closed_flag = False
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(target=self._beat, name="rlserve-ray-heartbeat", daemon=True)
        self._hb_thread.start()

    def close(self) -> None:
        self._closed_flag = True
        self._stop_heartbeat()
        if self._handle is not None:
            died = self._server.died if self._server is not None else None
            if died is not None:
                self._handle.set_state.remote("dead", f"the inference server died: {died!r}")
            else:
                self._handle.set_state.remote("closed", "the inference server is shut down")

    def _stop_heartbeat(self) -> None:
        self._hb_stop.set()
        t = self._hb_thread
        if t is not None and t is not threading.current_thread():
            t.join(2)
        self._hb_thread = None

    def _beat(self) -> None:
        """Tell the gateway the server is alive; report its death with the reason."""
        while not self._hb_stop.wait(_HEARTBEAT_S):
            server = self._server
            alive = server is not None and server.accepting and server.may_still_answer()
            reason = ""
            if not alive:
                died = server.died if server is not None else None
                reason = f"the inference server died: {died!r}" if died is not None else "the inference server thread is gone"
            try:
                self._handle.heartbeat.remote(alive, reason)
            except Exception:
                return
            if not alive:
                return

    def check_alive(self) -> None:
        if self._closed_flag:
            super().check_alive()

    def submit(self, td: TensorDictBase) -> Future:
        return self.client().submit(td)

    def _max_take(self) -> int:
        s = self._server
        return s.max_batch_size if s is not None else 64

    def _issue_poll(self) -> None:
        """Send the long-poll that brings the gateway's pending requests; wake us when it lands."""
        ref = self._handle.take.remote(self._max_take(), 0.25)
        fut = ref.future()
        self._poll = fut
        fut.add_done_callback(self._poll_done)

    def _poll_done(self, _fut) -> None:
        self.wake()

    def wake(self) -> None:
        try:
            self._signal.release()
        except RuntimeError:  # already released
            pass

    def _fetch(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the long-poll (sent if none is in flight)."""
        if self._poll is None:
            self._issue_poll()
        fut = self._poll
        if not fut.done():
            if timeout > 0:
                self._signal.acquire(timeout=timeout)
            else:
                self._signal.acquire(blocking=False)
            if not fut.done():
                return
        self._signal.acquire(blocking=False)  # consume a release left by this poll
        self._poll = None
        items = fut.result()
        now = _perf()
        for rid, payload, age in items:
            self._buf.append((rid, payload, now - age))
        # No new poll until the server is idle again: requests that arrive
        # while the model runs gather in the gateway and come as one batch.

    def wait_for_work(self, timeout: float) -> None:
        if not self._buf:
            self._fetch(timeout)

    def drain_timed(self, max_items: int) -> tuple[list, list, list[float]]:
        if not self._buf and self._poll is not None:
            self._fetch(0)
        buf = self._buf
        tds, cbs, ts = [], [], []
        bad_rids, bad = [], []
        while buf and len(tds) < max_items:
            rid, payload, t = buf.popleft()
            try:
                td = decode_td(payload)
            except Exception as e:  # malformed payload: its caller alone hears about it
                bad_rids.append(rid)
                bad.append(reply_error(e))
                continue
            tds.append(td)
            cbs.append(rid)
            ts.append(t)
        if bad:
            self._handle.answer.remote(bad_rids, bad)
        return tds, cbs, ts

    def drain(self, max_items: int) -> tuple[list, list]:
        tds, cbs, _ = self.drain_timed(max_items)
        return tds, cbs

    def resolve_batch(self, callbacks: Sequence, batch: TensorDictBase, policy_version: int) -> None:
        self._handle.answer.remote(list(callbacks), encode_replies(batch, len(callbacks)))

    def resolve(self, callback: Any, result: TensorDictBase) -> None:
        self._handle.answer.remote([callback], [reply_of(result)])

    def resolve_exception(self, callback: Any, exc: BaseException) -> None:
        if self._handle is not None:
            self._handle.answer.remote([callback], [reply_error(exc)])
