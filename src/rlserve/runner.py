"""The batch runner: every step of serving one drained batch, each written once.

group -> collate -> forward -> output -> answer:

* **group**: requests are grouped by signature (``collate.group_by_signature``);
  one that has none (not a TensorDict) fails alone;
* **collate**: a group becomes one batch: ``collate_fn`` when given, else the
  stacked leaves (a plain ``dict`` when the direct call below can run, a
  TensorDict otherwise), moved to ``device``;
* **forward**: a plain ``TensorDictModule`` is called as what it is (its
  network on the stacked tensors, ``_fastpath.py``); any other model as
  ``model(batch)``;
* **output**: the output must keep the leading batch dimension; it moves to
  ``output_device`` (or back where the requests came from when ``device`` is
  set) and gets its ``policy_version`` column: the one place answers are
  stamped;
* **answer**: the transport answers the whole batch (``resolve_batch``) or
  the server splits it into rows (``resolve_rows``).

The server holds its serve lock around :meth:`BatchRunner.run`, whichever
thread calls it.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import torch

from ._fastpath import direct_call
from ._td import TensorDictBase, new_td, set_leaf
from .collate import (
    batched_output,
    group_by_signature,
    is_fast,
    signature_device,
    split_leaves,
    split_rows,
    stack_group,
    stack_leaves,
)
from .errors import ServerDeadError
from .explain import explain_failure, model_reads
from .interaction import MARKER, code_of, interaction_type, running_as
from .stats import ServerStats
from .transport import InferenceTransport

__all__ = ["BatchRunner"]

log = logging.getLogger("rlserve")
_perf = time.perf_counter
_ACCEPTED_MAX = 64  # signatures remembered for error messages


class BatchRunner:
    """Runs batches of one model for one transport (see the module docstring).

    Args:
        model: batched TensorDict in, batched TensorDict out.
        transport: where answers go.
        stats: the server's counters.
        device: move each batch here before the forward (None: leave it).
        output_device: move outputs here (None: back to the requests' device
            when ``device`` is set, else leave them).
        collate_fn: ``list[TensorDict] -> TensorDict`` instead of stacking (it
            gets copies, so a batch never aliases a request).
        policy_version_key: where the version is stamped (None: nowhere).
        static_batch_size: pad every batch to this many rows by repeating its
            last request (the padding's outputs are dropped).
        interaction_type: the interaction type of requests that carry none.
    """

    def __init__(
        self,
        model: Callable[[TensorDictBase], TensorDictBase],
        transport: InferenceTransport,
        stats: ServerStats,
        *,
        device: torch.device | None = None,
        output_device: torch.device | None = None,
        collate_fn: Callable[[list], TensorDictBase] | None = None,
        policy_version_key: Any = "policy_version",
        static_batch_size: int | None = None,
        interaction_type: Any = None,
    ):
        self.model = model
        # the direct call builds flat rows: a nested version key takes the general path
        flat_key = policy_version_key is None or type(policy_version_key) is str
        self.direct = direct_call(model) if collate_fn is None and flat_key else None
        self.transport = transport
        self.whole_batches = transport.capabilities.whole_batches
        self.stats = stats
        self.device = device
        self.output_device = output_device
        self.collate_fn = collate_fn
        self.version_key = policy_version_key
        self.static = static_batch_size
        self.default_code = code_of(interaction_type)  # for requests whose caller had no interaction type
        self.graph = None  # a captured CUDA graph of the model (InferenceServer.prepare_cudagraph)
        self.accepted: dict = {}  # signatures the model ran, newest last (bounded): for error messages
        self.reads = model_reads(model)  # the keys the model reads, when it says: for error messages
        self.forward_avg_s = 0.0  # moving average of forward times
        self.last_batch = 0  # requests in the newest batch

    # -- one drained batch -----------------------------------------------------------
    def run(self, ins: list, cbs: list, ts: list, version: int) -> None:
        """Answer every request of one drained batch; re-raises only what must stop the server
        (KeyboardInterrupt, SystemExit...), after answering every caller."""
        self.last_batch = len(ins)
        self.stats.record_waits(_perf(), ts)
        groups, bad = group_by_signature(ins)
        for i, err in bad:
            self.stats.rejected += 1
            self.fail([cbs[i]], err)
        if len(groups) == 1 and not bad:
            (sig, _), = groups.items()
            self._run_group(sig, ins, cbs, ts, version)
            return
        todo = list(groups.items())
        for k, (sig, idx) in enumerate(todo):
            try:
                self._run_group(sig, [ins[i] for i in idx], [cbs[i] for i in idx], [ts[i] for i in idx], version)
            except BaseException as e:  # the server is stopping: answer the groups not yet run
                for _, rest in todo[k + 1:]:
                    self.fail([cbs[i] for i in rest], ServerDeadError(f"the inference server died: {e!r}"))
                raise

    def fail(self, cbs: Sequence, exc: BaseException) -> None:
        """Answer ``cbs`` with ``exc``; a caller that cannot be reached costs nobody else."""
        resolve_exception = self.transport.resolve_exception
        for cb in cbs:
            try:
                resolve_exception(cb, exc)
            except Exception:
                log.exception("rlserve: could not deliver an error to a caller")

    # -- the steps ---------------------------------------------------------------------
    def _run_group(self, sig: tuple, ins: list, cbs: list, ts: list, version: int) -> None:
        n = len(ins)
        try:
            batch = self._collate(sig, ins)
            bs = torch.Size([n, *sig[1]])  # the answers' batch size
            rows = n if self.static is None else self.static  # rows the model sees (padding included)
            t0 = _perf()
            out = self._forward(batch, sig, bs if rows == n else torch.Size([rows, *sig[1]]))
            t_fwd = _perf() - t0
            if rows != n:
                out = _first_rows(out, n, copy=self.graph is not None)
            out = self._output(out, sig, bs, version)
            if type(out) is dict:  # the direct call's leaves: rows straight from the columns
                rows = None if self.whole_batches else split_leaves(out, bs, None)
                if rows is None:
                    out = new_td(out, bs)
            else:
                rows = None if self.whole_batches else split_rows(out)
        except BaseException as e:
            self._fail_group(sig, e, cbs)
            return
        self._answer(sig, out, rows, cbs, ts, t_fwd, version)

    def _collate(self, sig: tuple, ins: list) -> TensorDictBase | dict:
        marked = sig[4] is not None  # the interaction type travels as an entry: not for the model
        if self.collate_fn is not None:
            batch = self.collate_fn([td.clone() for td in ins])  # copies: cannot alias requests
        elif self.direct is not None and self.graph is None and is_fast(sig) and self.direct.usable():
            src = stack_leaves(ins)  # {key: stacked tensor}: what the direct call reads
            if marked:
                del src[MARKER]
            if self.static is not None and self.static > len(ins):
                src = {k: _pad(v, self.static) for k, v in src.items()}
            if self.device is not None:
                src = {k: v.to(self.device) for k, v in src.items()}
            return src
        else:
            batch = stack_group(sig, ins)  # copies: the batch never aliases a request
        if marked:
            batch = batch.exclude(MARKER)
        if self.static is not None and self.static > len(ins):
            batch = _pad(batch, self.static)
        if self.device is not None:
            batch = batch.to(self.device)
        return batch

    def _forward(self, batch: TensorDictBase | dict, sig: tuple, bs: torch.Size) -> Any:
        """The model on ``batch`` (``bs``: its batch size), under the callers' interaction type."""
        code = sig[4]
        if code is None:
            code = self.default_code
        if code is None and interaction_type() is None:  # the usual case: no interaction type anywhere
            return self._call(batch, bs)
        with running_as(code):  # the callers' interaction type, whatever this thread's is
            return self._call(batch, bs)

    def _call(self, batch: TensorDictBase | dict, bs: torch.Size) -> Any:
        if type(batch) is dict:  # the direct call: leaves in, leaves out (shapes checked there)
            return self.direct(batch, bs)
        model = self.graph if self.graph is not None else self.model
        return batched_output(model(batch), bs[0])

    def _output(self, out: TensorDictBase | dict, sig: tuple, bs: torch.Size, version: int) -> TensorDictBase | dict:
        """Move the output where answers go, and stamp its version: the one place answers are stamped."""
        back = self.output_device
        if back is None and self.device is not None:
            back = signature_device(sig)
        flat = type(out) is dict
        if back is not None:
            out = {k: v.to(back) for k, v in out.items()} if flat else out.to(back)
        key = self.version_key
        if key is not None:
            if flat:
                out[key] = torch.full(bs, version, dtype=torch.int64, device=back)
            else:
                set_leaf(out, key, torch.full(out.batch_size, version, dtype=torch.int64, device=back))
        return out

    def _answer(self, sig, out, rows, cbs: list, ts: list, t_fwd: float, version: int) -> None:
        acc = self.accepted
        if sig not in acc:
            acc[sig] = True
            if len(acc) > _ACCEPTED_MAX:
                del acc[next(iter(acc))]
        self.forward_avg_s += (t_fwd - self.forward_avg_s) * 0.125  # smooth: one slow batch is no trend
        # counted before the answers go out: whoever holds an answer finds it in stats()
        self.stats.record_batch(len(cbs), t_fwd, _perf(), ts)
        if rows is None:
            try:
                self.transport.resolve_batch(cbs, out, version)
            except Exception:
                # Contract: resolve_batch answers every row or raises before answering any.
                log.exception("rlserve: resolve_batch failed")
                self.fail(cbs, ServerDeadError("the transport could not deliver this answer"))
        else:
            self.transport.resolve_rows(cbs, rows)

    def _fail_group(self, sig: tuple, e: BaseException, cbs: list) -> None:
        """The batch could not run: its callers get the (explained) error."""
        self.stats.errors += len(cbs)
        self.fail(cbs, explain_failure(self.accepted, sig, e, self.reads) if isinstance(e, Exception) else e)
        if not isinstance(e, Exception):
            raise e  # KeyboardInterrupt / SystemExit: the batch is answered, now stop


def _pad(x: Any, rows: int) -> Any:
    """``x`` (a batch, leading dim n) with its last row repeated up to ``rows`` rows."""
    extra = rows - x.shape[0]
    tail = x[-1:].expand(extra, *x.shape[1:])
    return torch.cat([x, tail], 0)


def _first_rows(out: Any, n: int, copy: bool) -> Any:
    """The first ``n`` rows of a padded output; ``copy`` when the output is a CUDA graph's static buffer."""
    if type(out) is dict:
        return {k: (v[:n].clone() if copy else v[:n]) for k, v in out.items()}
    out = out[:n]
    return out.clone() if copy else out
