"""What the server does for callers that are threads of its own process.

Two things, both about thread hand-overs, which cost ~25-30 us each on a VM
(see the README's Design section):

* caller runs: an idle server lets a blocked caller's thread run its batch;
* after answering a batch of actor threads, the server waits (bounded) for
  them to resubmit before its next forward.

A mixin of :class:`~rlserve.InferenceServer`: it uses the server's lock,
batching policy, transport and ``_process``.
"""
from __future__ import annotations

import logging
import threading
import time

import torch

log = logging.getLogger("rlserve")
_perf = time.perf_counter

# _let_callers_return: wait in slices of this long, at most this long per caller answered
# (about what one actor thread needs to resubmit on this class of machine, GIL included)
_RETURN_SLICE_S = 0.0002
_RETURN_PER_CALLER_S = 0.00005
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", torch.is_autocast_enabled)
_modes_on = getattr(torch._C, "_is_torch_function_mode_enabled", lambda: False)  # torch.device(...), set_default_device
_dispatch_modes_on = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


class CallerThreads:
    """Mixin: caller-run batches and the wait for answered threads (see the module doc)."""

    def _let_callers_return(self, wait_count, pending, answered: int) -> None:
        """Give the actor threads just answered the GIL to resubmit before the next forward.

        Their next requests join the next batch (fuller batches), and the
        forward then runs while they wait instead of handing the GIL to them
        at every torch op. Waits in slices while they keep coming back, and
        stops at the first slice in which none does (slow actors, or fewer
        actors than answered requests).
        """
        have = pending()
        # Callers answered first may be back already (done-callbacks, a forward of a later group
        # releasing the GIL): count from the queue as it was when answering began.
        mark, self._answer_mark = self._answer_mark, -1
        target = (mark if 0 <= mark <= have else have) + answered
        cap = getattr(self.transport, "max_pending", None)
        if cap is not None and target > cap:
            target = cap  # max_pending admits no more: waiting for them would only idle the server
        end = _perf() + answered * _RETURN_PER_CALLER_S
        try:
            while True:
                left = end - _perf()
                if left <= 0:
                    return
                wait_count(target, min(left, _RETURN_SLICE_S))
                now = pending()
                if now >= target or now == have or self._stop:
                    return
                have = now
        finally:
            release = self._release_answered
            if release is not None:
                release()  # callers still waiting for their turn: slow, or a turn cut short

    def _caller_hook(self):
        """What an in-process transport may call from a client thread when the server sleeps."""
        if self.run_in_caller and self.batching.min_batch_size == 1:
            return self._serve_in_caller
        return None

    def _serve_in_caller(self) -> bool:
        """Run one batch on the calling actor thread; False: wake the server instead.

        The caller is about to block on its own answer anyway, so doing the
        work itself skips two thread hand-overs. The forward runs as it would
        on the server thread: under the serve lock, without grad, with the
        server's intra-op thread count.
        """
        if self._last_batch > 1:
            return False  # actors are queueing up: the server forms fuller batches
        if torch.is_inference_mode_enabled() or _autocast_on() or _modes_on() or _dispatch_modes_on():
            # the caller's thread-local modes (inference mode, autocast, torch.device(...) as a
            # context or set_default_device, dispatch modes) would leak into the forward
            return False
        lock = self._serve_lock
        if not lock.acquire(False):
            return False  # a batch is running: the server (once woken) takes this one next
        grad = torch.is_grad_enabled()
        nt = self.num_threads
        old_nt = torch.get_num_threads() if nt is not None else None
        self._inline_ident = threading.get_ident()
        try:
            if not self._serving:
                return False
            torch.set_grad_enabled(False)
            if old_nt is not None and old_nt != nt:
                torch.set_num_threads(nt)
            try:
                self._apply_weight_updates()
            except Exception:
                log.exception("%s: applying new weights failed on a caller thread", self.name)
                return False  # the server thread meets the failure too, and handles it as always
            try:
                ins, cbs, ts = self.transport.drain_timed(self.batching.max_batch_size)
                if ins:  # else the server, awake after all, took them
                    self._process(ins, cbs, ts)
            except BaseException as e:
                # As on the server thread (e.g. the model raised SystemExit; the batch is
                # answered): the server dies and the caller sees the exception. Callers whose
                # answer it cut off (Ctrl-C mid-delivery) then get ServerDeadError, not a hang.
                self._die_from_caller(e)
                raise
            return True
        finally:
            torch.set_grad_enabled(grad)
            if old_nt is not None and old_nt != nt:
                torch.set_num_threads(old_nt)
            self._inline_ident = None
            lock.release()

    def _die_from_caller(self, e: BaseException) -> None:
        """A caller-run batch broke the way that kills the serving loop: stop the loop the same way."""
        log.exception("%s: serving loop died (in a batch run on a caller thread)", self.name)
        self._died = e
        self._serving = False  # refuse new calls now; the loop's exit fails whatever is still queued
        self._stop = True
        wake = getattr(self.transport, "_wake", None)
        if wake is not None:
            wake()
